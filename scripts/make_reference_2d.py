"""Reference data of the official 2D input and mask pipelines, for tests/test_official_2d_pipeline.py.

    python scripts/make_reference_2d.py --medsam /path/to/MedSAM --sam-med2d /path/to/SAM-Med2D \
        [--out tests/data/reference] [--work DIR]

Runs the OFFICIAL code of two checkouts on slices of the sample studies (scripts/sample_studies.py:
the synthetic CT, int16, 171 x 143 pixels a slice, and the MNI152 T1, uint8, 197 x 233; both
non-square) and writes what it produced, compactly, to `<out>/official2d.npz`. Nothing of the
official code is copied: it runs from the checkouts given.

1. MedSAM's pre_CT_MR.py, the volume -> uint8 slices step of MedSAM's pipeline (SAM-Med2D reads
   such uint8 pictures), run as it is in a folder laid out as it expects (data/FLARE22Train/images
   and labels; a label volume marks the slices to keep), once with its `modality = "CT"` and once
   with "MR" (the one setting the README says to edit). Kept: the uint8 slices it saved.
2. MedSAM's MedSAM_Inference.py, run as a script on each uint8 slice (written as the PNG it reads)
   with `--device cpu`. Its model is the official ViT-B loaded from seeded weights (samlabel.seeded,
   keys and shapes of tests/data/manifests/sam_vit_b.json; its builder always loads a file), whose
   image encoder records its input and answers zeros, and whose mask decoder answers the seeded
   logits of `designed_logits` (the networks' outputs do not matter: the code around them is what
   is compared). Kept: the encoder input and the mask the script writes.
3. SAM-Med2D's SammedPredictor (segment_anything/predictor_sammed.py) on each uint8 slice as 3
   channels (as cv2.imread gives a grey PNG): set_image, then predict(point, multimask_output=True)
   on the official ViT-B with adapters at 256 built without a checkpoint, encoder and decoder
   replaced as above (three seeded logit maps and fixed IoU scores). Kept: the encoder input, the
   low-res map it chose and the mask.

Both checkouts name their package `segment_anything`, so each official step runs in its own Python
process with its checkout first on sys.path. Their package __init__ imports torchvision for classes
not used here; where torchvision does not import (it does not beside this project's CPU torch) a
stand-in providing the four names imported, which raise if called, is put on the path.

Run this with an interpreter that has this project's requirements and what the official code
imports: scikit-image, matplotlib, SimpleITK, connected-components-3d and tqdm (MedSAM);
opencv-python-headless and albumentations (SAM-Med2D). tests/data/README.md gives the exact
commands. Reruns write byte-identical files.

Stored per case (slice): the official uint8 slice; MedSAM's encoder input by the sha256 of the
recorded float32 tensor, plus the uint8 1024^2 x 3 image the script normalised (checked here to give
that tensor bit for bit) at every MEDSAM_SAMPLE_STRIDE-th pixel with its min and max (the whole image
would be 200 kB a case); SAM-Med2D's encoder input as the uint8 256^2 image its nearest resize
picked, checked likewise against the recorded tensor; the masks as packed bits; the sha256 of each
seeded logit map (the tests rebuild them with `designed_logits`).
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # reference_source.py, beside this file
from reference_source import commit_of  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)  # SAM's, as float32 buffers hold them
PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)

# (name, sample study, modality for pre_CT_MR.py, slice k, MedSAM box [x0, y0, x1, y1], SAM-Med2D point [x, y])
# in the slice's pixels (x: column = array axis i, y: row = axis j); the logits' seed.
CASES = (
    ("ct_k20", "ct_synthetic.nii.gz", "CT", 20, (60, 40, 130, 110), (95, 75), 201),
    ("ct_k36", "ct_synthetic.nii.gz", "CT", 36, (30, 20, 150, 125), (70, 60), 202),
    ("mr_k100", "mni152_t1.nii.gz", "MR", 100, (40, 50, 160, 190), (98, 120), 203),
)
MEDSAM_LOW_RES, SAM_MED2D_LOW_RES = 256, 64
MEDSAM_SAMPLE_STRIDE = 61  # MedSAM's 1024^2 input is stored at every 61st pixel (and by hash)
SEEDED_MEDSAM, SEEDED_MEDSAM_SEED = "medsam_vit_b_seeded.pth", 2026  # MedSAM's builder needs a checkpoint file
SAM_MED2D_IOU = ((0.2, 0.9, 0.5), (0.7, 0.1, 0.3), (0.1, 0.4, 0.8))  # per case: best index 1, 0, 2


def designed_logits(seed: int, channels: int, size: int) -> torch.Tensor:
    """Low-res logits (1, channels, size, size), float32: smooth blobs of both signs plus noise,
    so that many pixels of the mask lie near its boundary."""
    generator = torch.Generator().manual_seed(seed)
    coarse = 8.0 * torch.randn((1, channels, 6, 6), generator=generator)
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (smooth + 0.5 * torch.randn((1, channels, size, size), generator=generator)).float()


def sha256(array) -> str:
    array = array.numpy() if isinstance(array, torch.Tensor) else array
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


# ---- step 1: pre_CT_MR.py (runs in a child process, MedSAM checkout on sys.path) -----------------

def stage_pre_ct_mr(checkout: Path, work: Path) -> None:
    """Run pre_CT_MR.py per modality on its own folder; save the uint8 slices it kept."""
    import nibabel as nib

    source = (checkout / "pre_CT_MR.py").read_text()
    setting = 'modality = "CT"'
    assert source.count(setting) == 1, f"pre_CT_MR.py no longer sets {setting!r}"
    slices = {}
    for modality in ("CT", "MR"):
        cases = [case for case in CASES if case[2] == modality]
        study = work / "studies" / cases[0][1]
        folder = work / f"flare_{modality}"
        (folder / "data" / "FLARE22Train" / "images").mkdir(parents=True)
        (folder / "data" / "FLARE22Train" / "labels").mkdir(parents=True)
        image = nib.load(str(study))
        os.symlink(study, folder / "data" / "FLARE22Train" / "images" / "case_0000.nii.gz")
        label = np.zeros(image.shape, dtype=np.uint8)  # a 40 x 40 square on each slice to keep
        for case in cases:
            label[50:90, 50:90, case[3]] = 1
        nib.save(nib.Nifti1Image(label, image.affine), str(folder / "data" / "FLARE22Train" / "labels" / "case.nii.gz"))
        cwd = os.getcwd()
        os.chdir(folder)
        try:
            code = compile(source.replace(setting, f'modality = "{modality}"'), str(checkout / "pre_CT_MR.py"), "exec")
            exec(code, {"__name__": "__main__", "__file__": str(checkout / "pre_CT_MR.py")})
        finally:
            os.chdir(cwd)
        saved = np.load(folder / "data" / "npy" / f"{modality}_Abd" / f"{modality}_Abd_case.npz")
        kept = sorted(case[3] for case in cases)
        assert saved["imgs"].shape[0] == len(kept), saved["imgs"].shape
        for case in cases:
            slices[case[0]] = saved["imgs"][kept.index(case[3])]
    np.savez(work / "pre_ct_mr.npz", **slices)


# ---- step 2: MedSAM_Inference.py ------------------------------------------------------------------

def stage_medsam(checkout: Path, work: Path) -> None:
    import runpy

    import segment_anything
    from skimage import io

    slices = np.load(work / "pre_ct_mr.npz")
    build = segment_anything.sam_model_registry["vit_b"]
    models = []  # built once, from the seeded checkpoint (MedSAM's builder always loads one)
    results = {}
    for name, _study, _modality, _k, box, _point, seed in CASES:
        recorded = {}

        def encoder(image, recorded=recorded):
            recorded["input"] = image.detach().clone()
            return torch.zeros((1, 256, 64, 64))

        def decoder(*args, seed=seed, **kwargs):
            return designed_logits(seed, 1, MEDSAM_LOW_RES), torch.ones((1, 1))

        def patched_build(checkpoint=None, encoder=encoder, decoder=decoder):
            if not models:
                models.append(build(checkpoint=str(work / SEEDED_MEDSAM)))
            models[0].image_encoder.forward = encoder
            models[0].mask_decoder.forward = decoder
            return models[0]

        segment_anything.sam_model_registry["vit_b"] = patched_build
        png, out = work / f"{name}.png", work / f"medsam_{name}"
        out.mkdir()
        io.imsave(png, slices[name], check_contrast=False)
        argv = sys.argv
        sys.argv = ["MedSAM_Inference.py", "-i", str(png), "-o", str(out), "--box", "[" + ",".join(map(str, box)) + "]",
                    "--device", "cpu", "-chk", "none"]
        try:
            torch.manual_seed(0)
            runpy.run_path(str(checkout / "MedSAM_Inference.py"), run_name="__main__")
        finally:
            sys.argv = argv
        results[f"{name}/input"] = recorded["input"].numpy()
        results[f"{name}/mask"] = io.imread(out / f"seg_{name}.png")
    np.savez(work / "medsam.npz", **results)


# ---- step 3: SAM-Med2D's SammedPredictor ----------------------------------------------------------

def stage_sam_med2d(checkout: Path, work: Path) -> None:
    from argparse import Namespace

    from segment_anything import sam_model_registry
    from segment_anything.predictor_sammed import SammedPredictor

    slices = np.load(work / "pre_ct_mr.npz")
    torch.manual_seed(0)
    model = sam_model_registry["vit_b"](Namespace(image_size=256, encoder_adapter=True, sam_checkpoint=None)).eval()
    results = {}
    for (name, _study, _modality, _k, _box, point, seed), iou in zip(CASES, SAM_MED2D_IOU):
        recorded = {}

        def encoder(image, recorded=recorded):
            recorded["input"] = image.detach().clone()
            return torch.zeros((1, 256, 16, 16))

        def decoder(*args, seed=seed, iou=iou, **kwargs):
            return designed_logits(seed, 3, SAM_MED2D_LOW_RES), torch.tensor([iou])

        model.image_encoder.forward = encoder
        model.mask_decoder.forward = decoder
        predictor = SammedPredictor(model)
        grey = slices[name]
        predictor.set_image(np.repeat(grey[:, :, None], 3, axis=-1))  # cv2.imread of a grey PNG: 3 equal channels
        masks, scores, low_res = predictor.predict(point_coords=np.array([point]), point_labels=np.array([1]),
                                                   multimask_output=True)
        results[f"{name}/input"] = recorded["input"].numpy()
        results[f"{name}/mask"] = masks[0] > 0.5
        results[f"{name}/low_res"] = low_res[0]
        results[f"{name}/score"] = scores
    np.savez(work / "sam_med2d.npz", **results)


def write_seeded_medsam(path: Path) -> None:
    """Seeded weights in the layout of Meta's SAM ViT-B (= medsam_vit_b.pth: a plain state dict), from
    the key/shape manifest of the official model (tests/data/manifests/sam_vit_b.json)."""
    sys.path.insert(0, str(REPO / "lib"))
    from samlabel.seeded import seeded_state_dict

    manifest = json.loads((REPO / "tests" / "data" / "manifests" / "sam_vit_b.json").read_text())
    torch.save(seeded_state_dict({key: shape for key, shape, _dtype in manifest["keys"]}, SEEDED_MEDSAM_SEED), path)


STAGES = {"pre_ct_mr": stage_pre_ct_mr, "medsam": stage_medsam, "sam_med2d": stage_sam_med2d}


TORCHVISION_STUB = '''"""Stand-in for torchvision, written by scripts/make_reference_2d.py: both checkouts' package
__init__ imports segment_anything/utils/transforms.py (ResizeLongestSide) and
automatic_mask_generator.py, which import these names; nothing run here calls them. Used only
where torchvision does not import."""


def _absent(*args, **kwargs):
    raise RuntimeError("torchvision is not installed (stand-in of scripts/make_reference_2d.py)")


{names} = _absent
'''
TORCHVISION_NAMES = {"transforms/functional.py": "resize = to_pil_image", "ops/boxes.py": "batched_nms = box_area"}


def torchvision_path(work: Path) -> list:
    """[] where torchvision imports, else a folder holding a stand-in for the names imported."""
    try:
        import torchvision.ops.boxes  # noqa: F401
        import torchvision.transforms.functional  # noqa: F401
        return []
    except Exception:
        root = work / "stubs" / "torchvision"
        for module, names in TORCHVISION_NAMES.items():
            (root / module).parent.mkdir(parents=True, exist_ok=True)
            (root / module).write_text(TORCHVISION_STUB.format(names=names))
        for folder in (root, root / "transforms", root / "ops"):
            (folder / "__init__.py").write_text("")
        return [str(work / "stubs")]


def run_stage(stage: str, checkout: Path, work: Path) -> None:
    path = [str(checkout)] + torchvision_path(work) + [os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--checkout", str(checkout),
                    "--work", str(work)], env=env, check=True, cwd=work)


# ---- packing --------------------------------------------------------------------------------------

def medsam_uint8(recorded: np.ndarray, slice_u8: np.ndarray) -> np.ndarray:
    """The uint8 1024^2 x 3 image behind MedSAM's recorded [0, 1] input (the min-max normalisation
    maps its min to 0 and its max to 1); checked to give the recorded float32 tensor exactly."""
    image = recorded[0].transpose(1, 2, 0).astype(np.float64)  # (H, W, 3)
    levels = np.unique(image)
    span = int(round(1 / np.diff(levels).min())) if len(levels) > 1 else 1
    candidates = [(int(slice_u8.min()), int(slice_u8.max()))] + [(low, low + span) for low in range(256 - span)]
    for low, high in candidates:
        u8 = np.rint(image * (high - low) + low).clip(0, 255).astype(np.uint8)
        again = (u8 - u8.min()) / np.clip(u8.max() - u8.min(), a_min=1e-8, a_max=None)
        if u8.min() == low and u8.max() == high and np.array_equal(again.astype(np.float32).transpose(2, 0, 1)[None],
                                                                    recorded):
            return u8
    raise AssertionError("no uint8 image gives the recorded MedSAM input")


def sam_med2d_uint8(recorded: np.ndarray) -> np.ndarray:
    """The uint8 256^2 image behind SAM-Med2D's recorded input; checked to give it exactly."""
    u8 = np.rint(recorded[0, 0] * PIXEL_STD[0] + PIXEL_MEAN[0]).astype(np.uint8)
    again = (np.repeat(u8[:, :, None], 3, axis=-1) - PIXEL_MEAN) / PIXEL_STD  # SammedPredictor's float32 arithmetic
    assert np.array_equal(again.transpose(2, 0, 1)[None], recorded), "SAM-Med2D input is not one uint8 image"
    return u8


def pack(work: Path, medsam_commit: str, sam_med2d_commit: str) -> dict:
    pre, medsam, sam_med2d = (np.load(work / f"{stage}.npz") for stage in ("pre_ct_mr", "medsam", "sam_med2d"))
    out = {"source": np.array(json.dumps({
        "MedSAM": {"repository": "bowang-lab/MedSAM", "commit": medsam_commit,
                   "code": ["pre_CT_MR.py", "MedSAM_Inference.py"]},
        "SAM-Med2D": {"repository": "OpenGVLab/SAM-Med2D", "commit": sam_med2d_commit,
                      "code": ["segment_anything/predictor_sammed.py (SammedPredictor)"]},
        "generator": "scripts/make_reference_2d.py",
        "medsam_sample_stride": MEDSAM_SAMPLE_STRIDE,
        "cases": [dict(zip(("name", "study", "modality", "slice", "medsam_box", "sam_med2d_point", "logits_seed"),
                           case)) for case in CASES],
    }))}
    for (name, _study, _modality, _k, _box, _point, seed), iou in zip(CASES, SAM_MED2D_IOU):
        out[f"{name}/slice_u8"] = pre[name]
        rows, columns = pre[name].shape
        # MedSAM
        image = medsam_uint8(medsam[f"{name}/input"], pre[name])  # (1024, 1024, 3)
        out[f"{name}/medsam_input_sha256"] = np.array(sha256(medsam[f"{name}/input"]))
        out[f"{name}/medsam_input_u8_range"] = np.array([image.min(), image.max()], dtype=np.uint8)
        out[f"{name}/medsam_input_u8_samples"] = image.transpose(2, 0, 1).reshape(3, -1)[:, ::MEDSAM_SAMPLE_STRIDE]
        logits = designed_logits(seed, 1, MEDSAM_LOW_RES)
        out[f"{name}/medsam_logits_sha256"] = np.array(sha256(logits))
        mask = medsam[f"{name}/mask"].astype(bool)
        assert mask.shape == (rows, columns) and 0 < mask.sum() < mask.size
        out[f"{name}/medsam_mask_bits"] = np.packbits(mask)
        # SAM-Med2D
        out[f"{name}/sam_med2d_input_u8"] = sam_med2d_uint8(sam_med2d[f"{name}/input"])
        logits = designed_logits(seed, 3, SAM_MED2D_LOW_RES)
        out[f"{name}/sam_med2d_logits_sha256"] = np.array(sha256(logits))
        best = int(np.argmax(iou))
        assert np.array_equal(sam_med2d[f"{name}/low_res"], logits[0, best].numpy()), "not the best-IoU map"
        out[f"{name}/sam_med2d_iou"] = np.array(iou, dtype=np.float32)
        out[f"{name}/sam_med2d_best"] = np.array(best)
        mask = sam_med2d[f"{name}/mask"]
        assert mask.shape == (rows, columns) and 0 < mask.sum() < mask.size
        out[f"{name}/sam_med2d_mask_bits"] = np.packbits(mask)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--medsam", type=Path, help="a checkout of bowang-lab/MedSAM")
    parser.add_argument("--sam-med2d", type=Path, help="a checkout of OpenGVLab/SAM-Med2D")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "reference")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--checkout", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:  # a child process: one official step
        torch.set_num_threads(1)
        STAGES[args.stage](args.checkout.resolve(), args.work)
        return 0
    if not (args.medsam and args.sam_med2d):
        parser.error("--medsam and --sam-med2d are required")
    medsam, sam_med2d = args.medsam.resolve(), args.sam_med2d.resolve()
    sys.path.insert(0, str(REPO / "scripts"))
    import sample_studies

    with tempfile.TemporaryDirectory(prefix="reference2d-") as tmp:
        work = args.work.resolve() if args.work else Path(tmp)  # --work: keep the intermediate files there
        work.mkdir(parents=True, exist_ok=True)
        sample_studies.write_sample_studies(work / "studies")
        write_seeded_medsam(work / SEEDED_MEDSAM)
        run_stage("pre_ct_mr", medsam, work)
        run_stage("medsam", medsam, work)
        run_stage("sam_med2d", sam_med2d, work)
        data = pack(work, commit_of(medsam), commit_of(sam_med2d))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "official2d.npz"
    np.savez_compressed(path, **data)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
