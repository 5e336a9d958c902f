"""Load test: K simulated annotators clicking through nginx on 1 or N app replicas (a benchmark).

    .venv/bin/python bench/load_test.py [--annotators 4] [--images 3] [--replicas 2] [--seconds 60 | --clicks C]
        [--think 0.5,2] [--models fastsam3d,sam_med3d,sam_med2d] [--configs single,affinity,round-robin]
        [--seed 0] [--json out.json]

Per configuration, fresh replicas (scripts/replicas.py: `monailabel start_server` each, Debian's nginx in
front, torch threads = cores / replicas) on seeded full-size checkpoints in the official formats and M
copies of the sample CT (distinct files: distinct images for the caches); each replica is warmed up with
one click per model on an image outside the M, straight to it (models loaded, code paths run). Then K
annotators click concurrently, each from its own loopback address (127.0.0.2, .3, ...: what nginx hashes,
and what tells annotators apart in the app), alternately Slicer- and OHIF-shaped:

  Slicer  opens each image (GET /datastore/image, as for an image of the server's datastore), then clicks
          as the plugin does: multipart `params` with the full click history, its segment name, the
          model's config values, `slice` for 2D models, result extension and dtype, and its default
          client id (the same for every Slicer); the answer is the label file and the result JSON.
  OHIF    clicks with `output=image`, no label, no client id (tests/test_click3d_server.py, ohif_infer).

An annotator segments one object at a time: a first click on a structure of the CT, then refinements a
few voxels away (positive and negative in turn), with the full history each time; then the next object,
on the next of the M images (each annotator starts on its own), with a model drawn from --models. Between
clicks it thinks for a uniform random time in --think (seeded). It stops after --clicks clicks, or when
--seconds have passed since the configuration's first click.

Measured: click latency (client side, HTTP round trip through nginx) p50 and p95, errors by kind
(status or exception), the embedding-cache hit rate and the share of clicks that continued an
interaction (from each replica's log of every click's result), clicks per second served, the replicas
each annotator reached (X-Samlabel-Replica), and each replica's peak resident memory (its process
tree, sampled every 0.5 s). Prints a markdown table; --json writes everything.
"""

import argparse
import json
import random
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import psutil
import requests
from requests_toolbelt.adapters.source import SourceAddressAdapter

from samlabel.seeded import write_seeded_checkpoints

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import replicas  # noqa: E402
import sample_studies  # noqa: E402

APP = REPO / "apps" / "fastsam3d"
TIMEOUT_S = 600
WARM_UP_IMAGE = "warm_up"
SLICER_CLIENT_ID = "user-xyz"  # the plugin's default: the same for every Slicer, so the app tells them apart by address
RESULT_LINE = re.compile(r"request \w+: (\w+): \{.*'interaction_continued': (True|False).*'embedding_reused': (True|False)")
CONFIGS = {"single": (1, "affinity"), "affinity": (None, "affinity"), "round-robin": (None, "round-robin")}


def write_checkpoints(folder: Path, models: List[str], seed: int) -> Dict[str, str]:
    """Seeded full-size checkpoints in each model's official file name and layout: the --conf entries."""
    folder.mkdir(parents=True)
    paths = write_seeded_checkpoints(folder, {name: seed + n for n, name in enumerate(models)})
    return {f"{name}_checkpoint": str(path) for name, path in paths.items()}


def write_studies(folder: Path, images: int) -> List[str]:
    """M copies of the sample CT and the warm-up image; the M datastore ids."""
    folder.mkdir(parents=True)
    first = folder / f"{WARM_UP_IMAGE}.nii.gz"
    sample_studies.write_ct(first)
    ids = [f"ct_{n}" for n in range(images)]
    for image in ids:
        shutil.copyfile(first, folder / f"{image}.nii.gz")
    return ids


@dataclass
class Click:
    kind: str  # slicer or ohif
    model: str
    image: str
    seconds: float
    replica: str
    error: str = ""  # "" when it succeeded: else the status or the exception's class


@dataclass
class Annotator:
    number: int
    kind: str
    address: str
    clicks: List[Click] = field(default_factory=list)
    open_errors: Counter = field(default_factory=Counter)


class Plan:
    """What the annotators do: the models (with their /info/), the images, the click points, the pacing."""

    def __init__(self, info: dict, models: List[str], images: List[str], think: List[float], clicks_per_object: int,
                 clicks: Optional[int], seconds: Optional[float]):
        self.models, self.images, self.think, self.clicks_per_object = models, images, think, clicks_per_object
        self.info = {name: info["models"][name] for name in models}
        self.clicks, self.seconds = clicks, seconds
        labels = sample_studies.ct_label_array()
        self.structures = [np.argwhere(labels == value) for value in np.unique(labels) if value]

    def spent(self, clicks: int, seconds: float) -> bool:
        """Whether an annotator with this many clicks, this long after the start, stops."""
        return clicks >= self.clicks if self.clicks is not None else seconds >= self.seconds

    def object_clicks(self, rng: random.Random, model: str):
        """A first click inside a structure, then refinements near it: (foreground, background) after each."""
        voxels = rng.choice(self.structures)
        first = [int(v) for v in voxels[rng.randrange(len(voxels))]]
        flat = self.info[model].get("dimension", 3) == 2  # a 2D model's clicks stay on the clicked slice
        foreground, background = [first], []
        yield foreground, background
        for step in range(1, self.clicks_per_object):
            near = [first[0] + rng.randint(-4, 4), first[1] + rng.randint(-4, 4), first[2] + (0 if flat else rng.randint(-2, 2))]
            (foreground if step % 2 else background).append(near)
            yield foreground, background

    def slicer_params(self, model: str, foreground, background, segment: str) -> dict:
        """SlicerPlugin.deepgrow's params (tests/test_slicer_protocol.py) for voxel clicks."""
        config = self.info[model].get("config") or {}
        params = {"label": segment, "foreground": foreground, "background": background,
                  **{k: (v[0] if isinstance(v, list) else v) for k, v in config.items()}}
        if self.info[model].get("dimension", 3) == 2:
            params["slice"] = foreground[-1][2]
        return {**params, "result_extension": ".nrrd", "result_dtype": "uint8", "client_id": SLICER_CLIENT_ID}


def ohif_params(foreground, background) -> dict:
    return {"foreground": foreground, "background": background, "result_extension": ".nrrd", "result_dtype": "uint8",
            "result_compress": False, "restore_label_idx": False}


def annotate(plan: Plan, url: str, annotator: Annotator, rng: random.Random, started: threading.Event,
             clock: dict) -> None:
    """One annotator's clicks until its budget is spent (see the module docstring)."""
    session = requests.Session()
    session.mount("http://", SourceAddressAdapter(annotator.address))
    started.wait()
    opened, number = None, 0
    while True:
        image = plan.images[(annotator.number + number) % len(plan.images)]
        model = rng.choice(plan.models)
        if annotator.kind == "slicer" and image != opened:
            try:
                response = session.get(f"{url}/datastore/image", params={"image": image}, timeout=TIMEOUT_S)
                if response.status_code != 200:
                    annotator.open_errors[f"HTTP {response.status_code}"] += 1
            except requests.RequestException as error:
                annotator.open_errors[type(error).__name__] += 1
            opened = image
        for foreground, background in plan.object_clicks(rng, model):
            time.sleep(rng.uniform(*plan.think))
            if plan.spent(len(annotator.clicks), time.monotonic() - clock["start"]):
                return
            if annotator.kind == "slicer":
                query = {"image": image}
                params = plan.slicer_params(model, foreground, background, f"segment {number}")
            else:
                query = {"image": image, "output": "image"}
                params = ohif_params(foreground, background)
            start = time.perf_counter()
            try:
                response = session.post(f"{url}/infer/{model}", params=query, files={"params": (None, json.dumps(params))},
                                        timeout=TIMEOUT_S)
                error = "" if response.status_code == 200 else f"HTTP {response.status_code}"
                replica = response.headers.get("X-Samlabel-Replica", "")
            except requests.RequestException as exception:
                error, replica = type(exception).__name__, ""
            annotator.clicks.append(Click(annotator.kind, model, image, time.perf_counter() - start, replica, error))
        number += 1


class MemorySampler(threading.Thread):
    """Peak resident memory of each process tree (a replica and anything it started), every 0.5 s."""

    def __init__(self, pids: List[int]):
        super().__init__(daemon=True)
        self.pids, self.peak_mb = pids, [0.0] * len(pids)
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.5):
            for n, pid in enumerate(self.pids):
                try:
                    process = psutil.Process(pid)
                    rss = sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
                except psutil.Error:
                    continue
                self.peak_mb[n] = max(self.peak_mb[n], rss / 2**20)

    def stop(self) -> List[float]:
        self.stopping.set()
        self.join()
        return self.peak_mb


def logged_results(log: Path) -> List[tuple]:
    """(model, interaction continued, embedding reused) of every click a replica served, from its log."""
    return [(m[1], m[2] == "True", m[3] == "True") for m in RESULT_LINE.finditer(log.read_text(errors="replace"))]


def warm_up(replica_url: str, plan: Plan) -> None:
    for model in plan.models:
        foreground, background = next(plan.object_clicks(random.Random(0), model))
        response = requests.post(f"{replica_url}/infer/{model}", params={"image": WARM_UP_IMAGE, "output": "json"},
                                 files={"params": (None, json.dumps(ohif_params(foreground, background)))}, timeout=TIMEOUT_S)
        response.raise_for_status()


def latencies(clicks: List[Click]) -> dict:
    seconds = [c.seconds for c in clicks if not c.error]
    return {"clicks": len(seconds), "p50_s": float(np.percentile(seconds, 50)) if seconds else None,
            "p95_s": float(np.percentile(seconds, 95)) if seconds else None}


def run_config(name: str, replica_count: int, balance: str, args, studies: Path, conf: Dict[str, str],
               images: List[str], work: Path) -> dict:
    extra = [item for key, value in {"models": ",".join(args.models), **conf}.items() for item in ("--conf", key, value)]
    cluster = replicas.start_cluster(APP, str(studies), replica_count, replicas.free_port(), work, extra, balance)
    try:
        plan = Plan(requests.get(f"{cluster.url}/info/", timeout=60).json(), args.models, images, args.think,
                    args.clicks_per_object, args.clicks, args.seconds)
        for replica_url in cluster.replica_urls:
            warm_up(replica_url, plan)
        skipped = [len(logged_results(work / f"replica-{n}" / "server.log")) for n in range(replica_count)]
        annotators = [Annotator(n, "slicer" if n % 2 == 0 else "ohif", f"127.0.0.{n + 2}") for n in range(args.annotators)]
        started, clock = threading.Event(), {}
        threads = [threading.Thread(target=annotate, args=(plan, cluster.url, a, random.Random(f"{args.seed}-{a.number}"),
                                                           started, clock)) for a in annotators]
        for thread in threads:
            thread.start()
        sampler = MemorySampler([p.pid for p in cluster.processes[:replica_count]])
        sampler.start()
        clock["start"] = time.monotonic()
        started.set()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - clock["start"]
        peak_mb = sampler.stop()
    finally:
        cluster.stop()
    served = [r for n in range(replica_count) for r in logged_results(work / f"replica-{n}" / "server.log")[skipped[n]:]]
    clicks = [c for a in annotators for c in a.clicks]
    errors = Counter(c.error for c in clicks if c.error)
    for annotator in annotators:
        errors.update({f"open: {kind}": n for kind, n in annotator.open_errors.items()})
    replica_names = {url.split("://", 1)[1]: f"replica-{n}" for n, url in enumerate(cluster.replica_urls)}
    return {
        "config": name, "replicas": replica_count, "balance": balance, "threads_per_replica": replicas.default_threads(replica_count),
        "annotators": len(annotators), "seconds": elapsed, "clicks_sent": len(clicks), **latencies(clicks),
        "clicks_per_second": sum(not c.error for c in clicks) / elapsed, "errors": dict(errors),
        "clicks_logged": len(served),
        "embedding_hit_rate": sum(r[2] for r in served) / len(served) if served else None,
        "interaction_continued_rate": sum(r[1] for r in served) / len(served) if served else None,
        "peak_rss_mb": peak_mb,
        "clicks_per_replica": dict(Counter(replica_names.get(c.replica, c.replica or "none") for c in clicks)),
        "by_model": {model: latencies([c for c in clicks if c.model == model]) for model in args.models},
        "by_shape": {kind: latencies([c for c in clicks if c.kind == kind]) for kind in ("slicer", "ohif")},
        "annotators_detail": [{"number": a.number, "kind": a.kind, "address": a.address, "clicks": len(a.clicks),
                               "replicas": sorted({replica_names.get(c.replica, c.replica) for c in a.clicks if c.replica})}
                              for a in annotators],
        "clicks_detail": [asdict(c) for c in clicks],
    }


def table(results: List[dict]) -> str:
    def number(value, digits=2, scale=1, unit=""):
        return "-" if value is None else f"{scale * value:.{digits}f}{unit}"

    lines = ["| configuration | replicas x threads | clicks | clicks/s | p50 (s) | p95 (s) | errors | embedding hits "
             "| interactions continued | replicas per annotator | peak RSS per replica (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        errors = ", ".join(f"{kind}: {n}" for kind, n in r["errors"].items()) or "0"
        per_annotator = statistics.mean(len(a["replicas"]) for a in r["annotators_detail"])
        lines.append(f"| {r['config']} | {r['replicas']} x {r['threads_per_replica']} | {r['clicks']} "
                     f"| {r['clicks_per_second']:.2f} | {number(r['p50_s'])} | {number(r['p95_s'])} | {errors} "
                     f"| {number(r['embedding_hit_rate'], 0, 100, ' %')} | {number(r['interaction_continued_rate'], 0, 100, ' %')} "
                     f"| {per_annotator:.1f} | {', '.join(f'{mb:.0f}' for mb in r['peak_rss_mb'])} |")
    models = list(results[0]["by_model"]) if results else []
    lines += ["", "| configuration | " + " | ".join(f"{m}: clicks, p50 / p95 (s)" for m in models) + " |",
              "|---|" + "---|" * len(models)]
    for r in results:
        lines.append(f"| {r['config']} | " + " | ".join(f"{s['clicks']}, {number(s['p50_s'])} / {number(s['p95_s'])}"
                                                        for s in r["by_model"].values()) + " |")
    return "\n".join(lines)


def pair(text: str) -> List[float]:
    low, high = (float(v) for v in text.split(","))
    if not 0 <= low <= high:
        raise argparse.ArgumentTypeError("MIN,MAX with 0 <= MIN <= MAX")
    return [low, high]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotators", type=int, default=4, help="K (at most 250: one loopback address each)")
    parser.add_argument("--images", type=int, default=3, help="M")
    parser.add_argument("--replicas", type=int, default=2, help="N of the affinity and round-robin configurations")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=float, default=None, help="per configuration (default 60)")
    budget.add_argument("--clicks", type=int, default=None, help="per annotator")
    parser.add_argument("--clicks-per-object", type=int, default=4, help="a first click and its refinements")
    parser.add_argument("--think", type=pair, default=[0.5, 2.0], help="MIN,MAX seconds between clicks")
    parser.add_argument("--models", type=lambda s: s.split(","), default=["fastsam3d", "sam_med3d", "sam_med2d"])
    parser.add_argument("--configs", type=lambda s: s.split(","), default=list(CONFIGS), help=", ".join(CONFIGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--work-dir", type=Path, default=None, help="kept afterwards (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.clicks is None and args.seconds is None:
        args.seconds = 60.0
    if not 1 <= args.annotators <= 250 or any(c not in CONFIGS for c in args.configs):
        parser.error(f"--annotators 1-250; --configs from {', '.join(CONFIGS)}")
    if replicas.nginx_missing():
        print(f"load_test: {replicas.nginx_missing()}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="samlabel-load-") as tmp:
        work = args.work_dir or Path(tmp)
        conf = write_checkpoints(work / "checkpoints", args.models, args.seed)
        images = write_studies(work / "studies", args.images)
        results = []
        for name in args.configs:
            count, balance = CONFIGS[name]
            results.append(run_config(name, count or args.replicas, balance, args, work / "studies", conf, images,
                                      work / name))
            print(table(results[-1:]).splitlines()[2], file=sys.stderr, flush=True)
    print(f"{args.annotators} annotators (Slicer and OHIF in turn), {args.images} images, models {','.join(args.models)}, "
          f"think {args.think[0]:g}-{args.think[1]:g} s, {args.clicks_per_object} clicks per object, "
          + (f"{args.clicks} clicks each" if args.clicks else f"{args.seconds:g} s per configuration") + f", seed {args.seed}")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
