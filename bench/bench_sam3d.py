"""SAM3D's automatic segmentation on the CPU (or --device cuda): what a volume costs.

Measured in one run, seeded full-size weights (ViT-B at the Synapse patch's 176 in-plane, the
1.88 M-parameter decoder):
  - encoder time per slice and decoder time per 64 x 176 x 176 window (medians of --repeats);
  - the feature cache's size per slice;
  - the whole pipeline (samlabel.autoseg.segment) on the sample CT (171 x 143 x 57, 0.8 x 0.8 x 2.5 mm)
    with Synapse-like plans (3 x 0.76 x 0.76 mm): first run, and again with every feature cached;
  - a 512 x 512 x 300 CT (0.7 x 0.7 x 1.0 mm): its preprocessing is run and timed, its windows and
    slices counted, and its time projected from the measured per-slice and per-window costs
    (--full-ct runs it for real: many minutes on 2 CPU threads).

    .venv/bin/python bench/bench_sam3d.py [--device cpu] [--repeats 3] [--full-ct]
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from samlabel import autoseg  # noqa: E402
from samlabel.modeling.build_sam3d_seg import build_sam3d_seg  # noqa: E402
from samlabel.seeded import nnunet_plans_info, seeded_state_dict  # noqa: E402
from bench_networks import median_seconds  # noqa: E402

PATCH = (64, 176, 176)
SPACING = (3.0, 0.76, 0.76)  # Synapse's target spacing, (z, y, x)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full-ct", action="store_true", help="segment the 512 x 512 x 300 CT for real")
    args = parser.parse_args(argv)

    model = build_sam3d_seg(img_size=PATCH[1], num_classes=14)
    model.load_state_dict(seeded_state_dict({k: v.shape for k, v in model.state_dict().items()}, 5))
    model = model.to(args.device).eval()
    plans = autoseg.Plans.from_dict(nnunet_plans_info(14, patch_size=PATCH, spacing=SPACING))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")

    slices = torch.randn(1, 1, 8, *PATCH[1:], device=args.device)
    encode_s = median_seconds(lambda: model.encode(slices), args.repeats, warm_up=False) / slices.shape[2]
    features = model.encode(torch.randn(1, 1, PATCH[0], *PATCH[1:], device=args.device))
    with torch.no_grad():
        decode_s = median_seconds(lambda: model.decode(features), args.repeats, warm_up=False)
    slice_bytes = features[0, :, 0].element_size() * features[0, :, 0].nelement()
    print(f"encoder: {encode_s:.3f} s per slice; decoder: {decode_s:.3f} s per {PATCH} window; "
          f"feature cache: {slice_bytes / 1024:.0f} KiB per slice and in-plane window (float32)")

    import sample_studies

    grid = sample_studies.NIFTI_CT
    volume, affine = sample_studies.ct_volume(grid), sample_studies.ct_affine(grid)
    cache = autoseg.FeatureCache(4e9)
    for label in ("first run", "features cached"):
        start = time.perf_counter()
        autoseg.segment(volume, affine, plans, model.encode, model.decode, cache=cache, image_key="sample-ct",
                        device=args.device)
        print(f"sample CT {grid.shape}: {label}: {time.perf_counter() - start:.1f} s ({len(cache)} slices cached)")

    shape, spacing = (512, 512, 300), (0.7, 0.7, 1.0)
    rng = np.random.default_rng(0)
    ct = rng.normal(40, 20, shape).astype(np.int16)
    ct_affine = np.diag([*spacing, 1.0])
    start = time.perf_counter()
    preprocessed = autoseg.preprocess(ct, ct_affine, plans)
    preprocess_s = time.perf_counter() - start
    padded = [max(n, p) for n, p in zip(preprocessed.data.shape[1:], PATCH)]
    starts = autoseg.window_starts(padded, PATCH)
    windows = len(starts[0]) * len(starts[1]) * len(starts[2])
    encoded = len(starts[1]) * len(starts[2]) * padded[0]
    projected = preprocess_s + encoded * encode_s + windows * decode_s
    print(f"512x512x300 CT: preprocessing {preprocess_s:.1f} s to {preprocessed.data.shape[1:]}; {windows} windows, "
          f"{encoded} slice encodings ({encoded * slice_bytes / 2**20:.0f} MiB of features); projected "
          f"{projected:.0f} s without mapping back ({encoded * encode_s:.0f} s encoder, {windows * decode_s:.0f} s decoder)")
    if args.full_ct:
        start = time.perf_counter()
        autoseg.segment(ct, ct_affine, plans, model.encode, model.decode, device=args.device)
        print(f"512x512x300 CT: segmented in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
