"""Encoder and decoder latency of the full-size 3D networks on CPU (or GPU), medians of repeats.

    .venv/bin/python bench/bench_networks.py --threads 2 --repeats 5 \
        [--official-sam-med3d /path/to/SAM-Med3D] [--official-fastsam3d /path/to/FastSAM3D]

With an official checkout (git clone of uni-medical/SAM-Med3D or arcadelab/FastSAM3D, kept
outside this project), its image encoder is built from that checkout with the same seeded
weights and timed in the same run; the speed-up and the largest output difference are printed.
"""

import argparse
import importlib.util
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from samlabel.modeling import build_fastsam3d, build_sam_med3d_turbo
from samlabel.predictor import SamPredictor3D
from samlabel.seeded import seeded_state_dict, seeded_volume

# Official encoder constructor arguments (SAM-Med3D build_sam3D_vit_b_ori; FastSAM3D validation_student.py).
OFFICIAL_ENCODERS = {
    "sam_med3d": dict(depth=12, embed_dim=768, num_heads=12, window_size=14, global_attn_indexes=[2, 5, 8, 11]),
    "fastsam3d": dict(depth=6, embed_dim=768, num_heads=6, window_size=0, global_attn_indexes=[2, 5, 8, 11], skip_layer=2),
}


def median_seconds(fn, repeats, warm_up: bool = True):
    """Median wall time of `repeats` calls of fn, after one untimed call unless warm_up is False."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def official_encoder(checkout: Path, name: str, state_dict):
    path = checkout / "segment_anything" / "modeling" / "image_encoder3D.py"
    spec = importlib.util.spec_from_file_location(f"official_{name}_image_encoder3D", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    encoder = module.ImageEncoderViT3D(img_size=128, patch_size=16, mlp_ratio=4, out_chans=384, qkv_bias=True,
                                       norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                                       **OFFICIAL_ENCODERS[name])
    prefix = "image_encoder."
    encoder.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
    return encoder.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--official-sam-med3d", type=Path)
    parser.add_argument("--official-fastsam3d", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {args.threads} threads, device {device}, medians of {args.repeats}")
    print("| model | encoder (s) | decoder call (s) | official encoder (s) | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|")
    volume = seeded_volume(7).to(device)
    official_paths = {"sam_med3d": args.official_sam_med3d, "fastsam3d": args.official_fastsam3d}
    for name, builder in (("fastsam3d", build_fastsam3d), ("sam_med3d", build_sam_med3d_turbo)):
        model = builder()
        state = seeded_state_dict({k: v.shape for k, v in model.state_dict().items()}, seed=0)
        model.load_state_dict(state)
        predictor = SamPredictor3D(model.to(device))
        with torch.inference_mode():
            encoder_s = median_seconds(lambda: predictor.set_volume(volume), args.repeats)
            embedding = predictor.image_embedding
            points = torch.tensor([[64, 60, 70], [70, 64, 58], [40, 90, 64]])
            previous, _ = predictor.predict(points[:1], [1])
            decoder_s = median_seconds(lambda: predictor.predict(points, [1, 1, 0], previous), args.repeats)
            row = [name, f"{encoder_s:.3f}", f"{decoder_s:.4f}", "", "", ""]
            if official_paths[name]:
                official = official_encoder(official_paths[name], name, state).to(device)

                def run_official():
                    out = official(volume)
                    return out[-1] if isinstance(out, list) else out  # FastSAM3D's encoder returns a list

                official_s = median_seconds(run_official, max(1, min(args.repeats, 3)))
                diff = (run_official() - embedding).abs().max().item()
                row[3:] = [f"{official_s:.3f}", f"{official_s / encoder_s:.1f}x", f"{diff:.1e}"]
        print("| " + " | ".join(row) + " |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
