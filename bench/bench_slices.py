"""End-to-end latency of the 2D models on one slice through a real `monailabel start_server`,
next to the official code's per-slice time in the same run.

    .venv/bin/python bench/bench_slices.py [--repeats 5] \
        [--official-segment-anything /path/to/segment-anything] [--official-sam-med2d /path/to/SAM-Med2D]

On the 512 x 512 x 300 CT of bench_clicks.py (one copy per model), Slicer-shaped requests with
`slice` 150: the first click on the slice, once the client has opened the image and the server
has read it (slice preprocessing, encoder, decoder, write), then clicks on the same slice
(decoder + write; median). With an
official checkout (kept outside this project), its image encoder and decoder are built with the
same seeded weights and timed on one preprocessed slice: the per-slice cost of code that
encodes every click.
"""

import argparse
import importlib.util
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests
import torch

from bench_clicks import APP, click, make_ct, start_server, wait_for_line
from samlabel.checkpoint import expected_shapes
from samlabel.registry import get_spec
from samlabel.seeded import save_in_official_layout, seeded_state_dict

SLICE = 150


def official_per_slice(checkout: Path, name: str, state: dict, repeats: int) -> float:
    """Median seconds of the official encoder + prompt encoder + decoder on one slice."""
    sys.path.insert(0, str(checkout))
    package = "segment_anything.modeling"
    modeling = importlib.util.spec_from_file_location(package, checkout / "segment_anything" / "modeling" / "__init__.py",
                                                      submodule_search_locations=[str(checkout / "segment_anything" / "modeling")])
    module = importlib.util.module_from_spec(modeling)
    sys.modules[package] = module
    modeling.loader.exec_module(module)
    from functools import partial

    size = get_spec(name).input_size[0]
    encoder_args = dict(depth=12, embed_dim=768, img_size=size, mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                        num_heads=12, patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=[2, 5, 8, 11],
                        window_size=14, out_chans=256)
    if name == "sam_med2d":
        encoder_args["adapter_train"] = True
    encoder = module.ImageEncoderViT(**encoder_args)
    prompt_encoder = module.PromptEncoder(embed_dim=256, image_embedding_size=(size // 16,) * 2,
                                          input_image_size=(size, size), mask_in_chans=16)
    decoder = module.MaskDecoder(num_multimask_outputs=3, transformer=module.TwoWayTransformer(
        depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    for prefix, part in (("image_encoder.", encoder), ("prompt_encoder.", prompt_encoder), ("mask_decoder.", decoder)):
        part.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        part.eval()
    image = torch.rand(1, 3, size, size)
    box = torch.tensor([[100.0, 100.0, 300.0, 260.0]]) * size / 1024

    def one_slice():
        with torch.inference_mode():
            embedding = encoder(image)
            sparse, dense = prompt_encoder(points=None, boxes=box, masks=None)
            decoder(image_embeddings=embedding, image_pe=prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense, multimask_output=name == "sam_med2d")

    one_slice()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        one_slice()
        times.append(time.perf_counter() - start)
    sys.path.remove(str(checkout))
    for key in [k for k in sys.modules if k.startswith("segment_anything")]:
        del sys.modules[key]
    return statistics.median(times)


def measure(work: Path, repeats: int, official_paths: dict, app: Path = APP, models=("medsam", "sam_med2d"),
            conf: dict = None) -> dict:
    """Per model: first (the first click on the slice, the image opened and read before), same (median
    of repeats same-slice clicks) and official (the official code per slice, where a checkout is given).
    conf: further --conf entries of the server."""
    studies = work / "studies"
    studies.mkdir()
    conf, states = {"models": ",".join(models), **(conf or {})}, {}
    for name in models:
        make_ct(studies / f"ct_{name}.nii.gz")
        spec = get_spec(name)
        states[name] = seeded_state_dict(expected_shapes(spec), 0)
        path = work / spec.checkpoint_file
        save_in_official_layout(spec, states[name], path)
        conf[f"{name}_checkpoint"] = path
    proc, url = start_server(studies, conf, work, app)
    rows = {}
    try:
        for name in models:
            image, centre = f"ct_{name}", [200, 230, SLICE]
            assert requests.get(f"{url}/datastore/image", params={"image": image}, timeout=600).status_code == 200
            wait_for_line(work / "server.log", f"prefetched {image}")  # Slicer opens the image before any click
            corner = [250, 280, SLICE]  # MedSAM: two clicks span its box
            first_clicks = [centre, corner] if name == "medsam" else [centre]
            first = click(url, name, image, first_clicks, [], "user", slice=SLICE)
            same = []
            for step in range(repeats):
                foreground = first_clicks + [[205 + step, 235, SLICE]]
                same.append(click(url, name, image, foreground, [], "user", slice=SLICE))
            rows[name] = {"first": first, "same": statistics.median(same)}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    for name in models:
        if official_paths.get(name):
            rows[name]["official"] = official_per_slice(official_paths[name], name, states[name], max(1, min(repeats, 3)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--official-segment-anything", type=Path, help="checkout of facebookresearch/segment-anything (MedSAM)")
    parser.add_argument("--official-sam-med2d", type=Path, help="checkout of OpenGVLab/SAM-Med2D")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count()))
    official_paths = {"medsam": args.official_segment_anything, "sam_med2d": args.official_sam_med2d}
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(Path(tmp), args.repeats, official_paths)
    print(f"512x512x300 CT, slice {SLICE}, torch threads {torch.get_num_threads()}, HTTP round trips, medians")
    print("| model | first click on the slice (s) | same-slice click (s) | official code per slice (s) |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        yardstick = f"{row['official']:.2f}" if "official" in row else "-"
        print(f"| {name} | {row['first']:.2f} | {row['same']:.3f} | {yardstick} |")


if __name__ == "__main__":
    main()
