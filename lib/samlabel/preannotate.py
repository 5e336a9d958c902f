"""samlabel-preannotate: one model over every image of a datastore, on a pool of Ray actors.

    samlabel-preannotate --app apps/fastsam3d --studies <folder | DICOMweb URL> --model sam3d_synapse \\
        [--actors 2] [--label-tag preannotation] [--prompt-tag original] [--address HOST:PORT] [--conf KEY VALUE]

The command (Ray's driver) opens the app's own datastore (its init_datastore: a studies folder, or
a DICOMweb store with our DICOM SEG metadata), lists the images and leaves out those that already
have a label under --label-tag. Each actor holds one engine, made as the app makes it (the model's
TaskConfig: checkpoint, --conf keys), and takes a whole GPU (--gpus-per-actor; a fraction shares
one) or, without GPUs, --cpus-per-actor CPUs (a fraction shares a core; torch gets that many
threads, at least one). The driver ships each image file (and its prompt label) to an actor as
bytes, so actors need no access to the studies, only to the checkpoints at the same path. A
result comes back as a label map on the image's own grid; the driver writes it as the app writes
its results (MONAI Label's ITK writer) and saves it with the datastore's save_label. On a
DICOMweb store the tag is `final`, the one tag MONAI Label keeps in the store: each label
becomes a DICOM SEG of its series, as a label saved from the app does.

Automatic models (the SAM3D entries) need only the image. Click models are prompted from a
coarse label of the image (--prompt-tag), structure by structure, a structure being a connected
part of one label value with at least MIN_STRUCTURE_VOXELS voxels:
- 3D click models (FastSAM3D, SAM-Med3D): one positive click at the structure's deepest voxel,
  the one farthest in mm from its border. It lies inside even where the centroid does not (a
  C-shaped or hollow structure), and the model window (128 x 1.5 mm) is centred on it, so a
  structure up to 192 mm across is seen whole.
- 2D models, on every slice the structure crosses, per connected part on the slice: box models
  (MedSAM) get the part's bounding box, point models (SAM-Med2D) a click at its deepest pixel.
Each mask is written with its structure's value; where masks overlap, the first one written
keeps the voxel (label values in increasing order, larger parts first).

Resuming: an image whose label with the tag is in the datastore is never redone, so a run killed
at any point (SIGKILL included) is finished by running the same command again. The progress
record (--state, JSON, rewritten atomically after each image) lists what was done, with times and
prompts, and what failed and why; failed images are tried again by the next run.

Ray: without --address, a local instance with this machine's CPUs and GPUs, listening on loopback
only, that ends with the command; --address joins a running cluster (the GCS address that `ray
start --head` prints; ray://HOST:10001 with Ray Client, `pip install "ray[client]"`). Clusters
with token authentication (Ray's default) also need RAY_AUTH_MODE=token and their token. A progress
bar shows on a terminal, a log gets one line per image; the last line on stdout is a JSON summary.
"""

import argparse
import hashlib
import ipaddress
import json
import logging
import os
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import requests
import torch
from scipy import ndimage

from .autoseg import FeatureCache
from .configs import config_families
from .datastore import InvalidName, check_name
from .errors import InputError
from .files import atomic_write
from .images import ImageCache, load_image
from .registry import get_spec
from .request import ClickRequest
from .settings import AppSettings, ConfError

logger = logging.getLogger(__name__)

AUTOMATIC = "auto3d"  # the registry family of the models that take no prompts
MIN_STRUCTURE_VOXELS = 8  # a coarse label's smaller specks are noise, not structures to prompt
TASKS_PER_ACTOR = 2  # one segmenting, one queued: the next image travels while the actor works
DICOMWEB_TAG = "final"  # the one tag MONAI Label's DICOMweb datastore writes to the store (as DICOM SEG)
# Ray takes the loopback address as the node's only where clusters are off (macOS, Windows); then
# every server of the local instance binds to loopback. ray.init(_node_ip_address="127.0.0.1")
# does not do it: Ray swaps an explicit loopback address for the outward one.
RAY_LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


# ---- prompts from a coarse label ------------------------------------------------------------------
@dataclass(frozen=True)
class Structure:
    """One connected part of one value of a coarse label, and the prompt made from it."""

    value: int
    voxels: int
    click: Tuple[int, int, int]  # its deepest voxel (2D: the deepest pixel of its part on slice k)
    box: Optional[Tuple[int, int, int, int]] = None  # 2D: (i_a, i_b, j_a, j_b), its part's bounding box on slice k


def deepest(mask: np.ndarray, spacing) -> Tuple[int, ...]:
    """The index of mask's voxel farthest (in mm) from the mask's border; the array's edge is border."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[(slice(1, -1),) * mask.ndim]
    return tuple(int(c) for c in np.unravel_index(int(np.argmax(depth)), mask.shape))


def parts(mask: np.ndarray) -> List[Tuple[Tuple[slice, ...], np.ndarray]]:
    """(bounding box, the part's mask within it) of mask's connected parts (faces touching), largest first."""
    numbered, _ = ndimage.label(mask)
    found = [(box, numbered[box] == n) for n, box in enumerate(ndimage.find_objects(numbered), start=1)]
    return sorted((p for p in found if p[1].sum() >= MIN_STRUCTURE_VOXELS), key=lambda p: -int(p[1].sum()))


def label_values(array: np.ndarray) -> List[int]:
    return [int(v) for v in np.unique(array) if v > 0]


def structures_3d(label: np.ndarray, spacing) -> List[Structure]:
    """One click per structure, at its deepest voxel."""
    found = []
    for value in label_values(label):
        for box, part in parts(label == value):
            click = tuple(s.start + c for s, c in zip(box, deepest(part, spacing)))
            found.append(Structure(value, int(part.sum()), click))
    return found


def structures_2d(label: np.ndarray, spacing) -> List[Structure]:
    """Slice by slice (each slice is encoded once), each part of each value on the slice: its
    bounding box and deepest pixel."""
    found = []
    for k in range(label.shape[2]):
        plane = label[:, :, k]
        for value in label_values(plane):
            for (rows, columns), part in parts(plane == value):
                i, j = deepest(part, spacing[:2])
                found.append(Structure(value, int(part.sum()), (rows.start + i, columns.start + j, k),
                                       (rows.start, rows.stop - 1, columns.start, columns.stop - 1)))
    return found


def prompt_request(spec, structure: Structure) -> ClickRequest:
    """The click request that prompts spec's model with structure (see the module docstring)."""
    if spec.engine.dimension == 2 and spec.prompt.takes_box:
        i_a, i_b, j_a, j_b = structure.box
        k = structure.click[2]  # a part one pixel wide still gets a box one pixel wide (an empty one is refused)
        return ClickRequest(roi=(i_a, max(i_b, i_a + 1), j_a, max(j_b, j_a + 1), k, k), slice_index=k, reset=True)
    return ClickRequest(foreground=(structure.click,), reset=True)


# ---- the actors -------------------------------------------------------------------------------------
def task_config(app_dir: str, model: str, conf: Dict[str, str], device: str = "cpu"):
    """The model's TaskConfig as the app makes it (its engine, checkpoint paths, --conf keys);
    nothing is loaded yet. Raises settings.ConfError for a bad --conf."""
    conf = {**conf, "models": model, "device": device}
    settings = AppSettings.from_conf(conf)
    config = config_families()[get_spec(model).family]()
    # images are read once each: the cache keeps only the one being segmented
    config.init(model, str(Path(app_dir) / "model"), conf, None, settings=settings, images=ImageCache(0))
    return config


def pack(path: str) -> Dict:
    """A file, or a folder of files (a DICOM series), as bytes to ship to an actor."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {"name": root.name, "files": {str(p.relative_to(root)) if p != root else "": p.read_bytes() for p in files}}


def unpack(payload: Dict, folder: str) -> str:
    """Write a packed file or folder under folder; its path."""
    path = Path(folder) / payload["name"]
    for relative, data in payload["files"].items():
        target = path / relative if relative else path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return str(path)


class Annotator:
    """One engine, segmenting one image at a time (Ray runs one of these per actor)."""

    def __init__(self, app_dir: str, model: str, conf: Dict[str, str], device: str, threads: int):
        torch.set_num_threads(threads)
        config = task_config(app_dir, model, conf, device)
        config.load_weights()  # now: a bad checkpoint stops the run before the first image
        self.engine, self.spec, self.device = config.engine, config.spec, device
        if self.spec.family == AUTOMATIC:
            self.engine.features = FeatureCache(0)  # each image is segmented once: no features to keep

    def ready(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()} ({self.device})"

    def annotate(self, image: Dict, prompt: Optional[Dict] = None) -> Dict:
        """The label map on the image's grid ("pred", uint8), the image's "affine", the "labels"
        found (name -> value) and the "info" of the run."""
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="samlabel-preannotate-") as folder:
            path = unpack(image, folder)
            if prompt is None:
                data = self.engine.segment(path)
                pred, affine, info = data["pred"], data["affine"], {"labels_found": data["result"]["labels_found"]}
                labels = {name: value for name, value in self.spec.labels.items() if name in info["labels_found"]}
            else:
                pred, affine, info = self.prompted(path, unpack(prompt, os.path.join(folder, "prompt")))
                labels = {f"label {value}": value for value in label_values(pred)}
        info.update(seconds=round(time.perf_counter() - started, 3), actor=self.ready())
        return {"pred": pred, "affine": affine, "labels": labels, "info": info}

    def prompted(self, path: str, prompt_path: str):
        image = self.engine.images.get(path)
        label = np.rint(load_image(prompt_path).array).astype(np.int64)
        if label.shape != image.array.shape:
            raise InputError(f"the prompt label has shape {label.shape}, its image {image.array.shape}: not on its grid")
        spacing = np.linalg.norm(image.affine[:3, :3], axis=0)
        volumetric = self.engine.dimension == 3
        structures = structures_3d(label, spacing) if volumetric else structures_2d(label, spacing)
        pred = np.zeros(image.array.shape, np.uint8)
        for structure in structures:
            where = np.s_[...] if volumetric else np.s_[:, :, structure.click[2]]
            mask = self.engine.segment(path, prompt_request(self.spec, structure), commit=False).mask[where]
            pred[where][(mask > 0) & (pred[where] == 0)] = structure.value
        return pred, image.affine, {"prompts": [asdict(s) for s in structures] if volumetric else len(structures)}


# ---- the driver -------------------------------------------------------------------------------------
def open_datastore(app_dir: str, studies: str):
    """The app's own datastore for studies (its init_datastore), without making the app: that
    method reads only the app folder and the studies."""
    from monailabel.utils.others.class_utils import get_class_of_subclass_from_file

    app_class = get_class_of_subclass_from_file("main", os.path.join(app_dir, "main.py"), "MONAILabelApp")
    app = app_class.__new__(app_class)
    app.app_dir, app.studies = app_dir, studies
    return app.init_datastore()


def is_dicomweb(studies: str) -> bool:
    return studies.startswith(("http://", "https://"))


def labelled(store, images: List[str], tag: str) -> set:
    """The images that have a label under tag (on DICOMweb: a DICOM SEG of the series in the store)."""
    from monailabel.datastore.dicom import DICOMWebDatastore

    if isinstance(store, DICOMWebDatastore):
        return set(store.get_labeled_images()) & set(images)
    return {image for image in images if tag in store.get_labels_by_image_id(image)}


def save_result(store, image: str, result: Dict, tag: str, info: Dict) -> None:
    """Write the label as the app writes a result and save it under tag."""
    from monailabel.transform.writer import write_itk

    with tempfile.TemporaryDirectory(prefix="samlabel-preannotate-") as folder:
        path = os.path.join(folder, "label.nii.gz")
        write_itk(result["pred"], path, result["affine"], "uint8", True)
        names = [{"idx": value, "name": name} for name, value in result["labels"].items()]
        store.save_label(image, path, tag, {**info, "label_info": names})


class Progress:
    """The progress record: this run's identity, the images done (with their info) and failed."""

    def __init__(self, path: Path, run: Dict):
        self.path, self.run = path, run
        self.done: Dict[str, Dict] = {}
        self.failed: Dict[str, str] = {}
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("run") != run:
                raise ValueError(f"{path} records another run ({record.get('run')}); name another --state")
            self.done, self.failed = record["done"], record["failed"]

    def record(self, image: str, info: Optional[Dict] = None, error: Optional[str] = None) -> None:
        if error is None:
            self.done[image] = info
            self.failed.pop(image, None)
        else:
            self.failed[image] = error
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"run": self.run, "done": self.done, "failed": self.failed}
        atomic_write(str(self.path), data=json.dumps(record, indent=1, default=str).encode())


def parse_args(argv=None) -> Tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="samlabel-preannotate", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[5:]))
    parser.add_argument("--app", required=True, help="the app folder (its main.py, its model/ checkpoints)")
    parser.add_argument("--studies", required=True, help="a studies folder or a DICOMweb URL, as the app takes it")
    parser.add_argument("--model", required=True, help="a registered model, e.g. sam3d_synapse, fastsam3d, medsam")
    parser.add_argument("--label-tag", help="tag of the labels written (default: preannotation; on DICOMweb: final)")
    parser.add_argument("--prompt-tag", help="click models: tag of the coarse labels the prompts come from")
    parser.add_argument("--actors", type=int, help="model actors (default: one per GPU, else one)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs each actor takes; fractions share (default 1)")
    parser.add_argument("--gpus-per-actor", type=float, help="GPUs each actor takes (default: 1 where the cluster has GPUs, else 0)")
    parser.add_argument("--address", help="a running Ray cluster (default: a local instance on loopback)")
    parser.add_argument("--state", help="the progress record (default: <app>/preannotation/<model>.<tag>.<studies hash>.json)")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="the app's --conf keys, e.g. <model>_checkpoint PATH (models and device are set here)")
    return parser, parser.parse_args(argv)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse what cannot run, before Ray starts: parser.error (exit 2) with the reason."""
    try:
        spec = get_spec(args.model)
    except KeyError as error:
        parser.error(error.args[0])
    dicomweb = is_dicomweb(args.studies)
    args.label_tag = args.label_tag or (DICOMWEB_TAG if dicomweb else "preannotation")
    if spec.family == AUTOMATIC and args.prompt_tag:
        parser.error(f"{args.model} is an automatic model: it takes no prompts, leave out --prompt-tag")
    if spec.family != AUTOMATIC and not args.prompt_tag:
        parser.error(f"{args.model} is a click model: --prompt-tag names the coarse labels its prompts come from")
    try:
        for tag in filter(None, (args.label_tag, args.prompt_tag)):
            check_name(tag, "tag")
    except InvalidName as error:
        parser.error(error.msg)
    if args.prompt_tag == args.label_tag:
        parser.error(f"--label-tag and --prompt-tag are both {args.label_tag!r}: the results would replace their prompts")
    if dicomweb and args.label_tag != DICOMWEB_TAG:
        parser.error(f"on a DICOMweb store the labels are DICOM SEGs under the tag {DICOMWEB_TAG!r}; MONAI Label "
                     f"keeps a label tagged {args.label_tag!r} only in this machine's cache")
    if not dicomweb and not os.path.isdir(args.studies):
        parser.error(f"--studies {args.studies}: no such folder")
    if dicomweb:
        try:  # any answer will do; MONAI Label's client retries for half a minute before it says so
            requests.get(args.studies, timeout=30)
        except requests.RequestException as error:
            parser.error(f"--studies {args.studies}: the DICOMweb store cannot be reached: {error}")
    if not os.path.isfile(os.path.join(args.app, "main.py")):
        parser.error(f"--app {args.app}: no main.py there")
    if args.actors is not None and args.actors < 1 or args.cpus_per_actor <= 0 or (args.gpus_per_actor or 0) < 0:
        parser.error("--actors must be at least 1, --cpus-per-actor above 0 and --gpus-per-actor at least 0")
    try:
        config = task_config(args.app, args.model, dict(args.conf))
    except ConfError as error:
        parser.error(str(error))
    if config.missing:
        parser.error(f"{args.model}: {config.missing}")


def on_loopback(address: Optional[str]) -> bool:
    """Whether Ray runs on loopback only: a local instance, or a cluster addressed on loopback
    (`ray start --head --node-ip-address 127.0.0.1`), whose node address the driver must share."""
    if address is None:
        return True
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def start_ray(address: Optional[str]):
    if on_loopback(address):
        os.environ.update(RAY_LOOPBACK_ONLY)  # read when ray is imported, and by every process it starts
    import ray

    if address is None:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
        return ray
    try:
        ray.init(address=address)
    except ConnectionError as error:
        raise SystemExit(f"samlabel-preannotate: error: cannot join the Ray cluster at {address}: {error}") from None
    return ray


def start_actors(ray, args, count: int) -> list:
    """count actors, each with its model loaded; SystemExit when the cluster cannot hold them."""
    resources = ray.cluster_resources()
    gpus = args.gpus_per_actor if args.gpus_per_actor is not None else float(resources.get("GPU", 0) > 0)
    count = min(args.actors or (int(resources["GPU"] // gpus) if gpus else 1), count)
    for kind, each in (("CPU", args.cpus_per_actor), ("GPU", gpus)):
        if count * each > resources.get(kind, 0) + 1e-9:
            raise SystemExit(f"samlabel-preannotate: error: {count} actors x {each:g} {kind}s need {count * each:g} "
                             f"{kind}s; the Ray cluster has {resources.get(kind, 0):g}: lower --actors or --{kind.lower()}s-per-actor")
    remote = ray.remote(Annotator).options(num_cpus=args.cpus_per_actor, num_gpus=gpus)
    threads = max(1, int(args.cpus_per_actor))
    actors = [remote.remote(os.path.abspath(args.app), args.model, dict(args.conf), "cuda" if gpus else "cpu", threads)
              for _ in range(count)]
    try:
        where = ray.get([actor.ready.remote() for actor in actors])
    except ray.exceptions.RayError as error:
        raise SystemExit(f"samlabel-preannotate: error: the model did not load: {error}") from None
    logger.info(f"{count} actors of {args.model} ready: {', '.join(where)}")
    return actors


def results(ray, actors: list, jobs: List[str], ship) -> Iterator[Tuple[str, Optional[Dict], Optional[str]]]:
    """(image, result, None) or (image, None, why it failed) as the actors finish; ship(image) ->
    the annotate() arguments. Each actor has up to TASKS_PER_ACTOR images; a dead actor gets no more."""
    queue = iter(jobs)
    running = {}  # result ref -> (image, actor)
    unshipped = []  # (image, None, why)

    def give(actor) -> None:
        for image in queue:
            try:
                running[actor.annotate.remote(*ship(image))] = (image, actor)
                return
            except Exception as error:  # noqa: BLE001 - e.g. a series refused or not downloaded: the next image
                unshipped.append((image, None, f"not read: {type(error).__name__}: {error}"))

    for _ in range(TASKS_PER_ACTOR):
        for actor in actors:
            give(actor)
    while running:
        yield from unshipped
        unshipped.clear()
        [ref], _ = ray.wait(list(running), num_returns=1)
        image, actor = running.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayTaskError as error:  # the image failed, the actor goes on
            give(actor)
            yield image, None, f"{type(error.cause).__name__}: {error.cause}"
        except ray.exceptions.RayError as error:  # the actor is gone
            yield image, None, f"{type(error).__name__}: {error}"
        else:
            give(actor)  # the next image travels while this result is saved
            yield image, result, None
    yield from unshipped
    for image in queue:
        yield image, None, "not started: no actor is left"


def default_state(args) -> Path:
    digest = hashlib.sha256(args.studies.encode()).hexdigest()[:12]
    return Path(args.app) / "preannotation" / f"{args.model}.{args.label_tag}.{digest}.json"


def main(argv=None) -> int:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    # dcmqi's itkimage2segimage (DICOM SEG) is installed beside this Python; else MONAI Label downloads it
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    parser, args = parse_args(argv)
    check_args(parser, args)
    started = time.perf_counter()
    try:
        store = open_datastore(os.path.abspath(args.app), args.studies)
        images = sorted(store.list_images())
        done = labelled(store, images, args.label_tag)
    except OSError as error:  # requests' errors are OSErrors too
        parser.error(f"--studies {args.studies}: the datastore cannot be read: {error}")
    run = {"studies": args.studies, "model": args.model, "label_tag": args.label_tag, "prompt_tag": args.prompt_tag}
    try:
        progress = Progress(Path(args.state) if args.state else default_state(args), run)
    except ValueError as error:
        parser.error(str(error))
    prompts = {}
    if args.prompt_tag:
        prompts = {image: store.get_label_uri(image, args.prompt_tag) for image in images if image not in done}
    jobs = [image for image in images if image not in done and (not args.prompt_tag or prompts[image])]
    summary = {"annotated": [], "already_done": sorted(done), "failed": {},
               "without_prompt": sorted(image for image, path in prompts.items() if not path)}
    logger.info(f"{len(images)} images, {len(done)} already labelled {args.label_tag!r}, {len(jobs)} to annotate "
                f"with {args.model}" + (f" ({len(summary['without_prompt'])} without a {args.prompt_tag!r} label)"
                                        if args.prompt_tag else ""))

    def ship(image: str) -> tuple:
        return pack(store.get_image_uri(image)), pack(prompts[image]) if args.prompt_tag else None

    if jobs:
        ray = start_ray(args.address)
        try:
            actors = start_actors(ray, args, len(jobs))
            segmenting = time.perf_counter()
            with logging_redirect_tqdm(), tqdm(total=len(jobs), unit="image", desc=args.model, disable=None) as bar:
                for image, result, error in results(ray, actors, jobs, ship):
                    if result is not None:
                        info = {"model": args.model, "prompt_tag": args.prompt_tag, **result["info"]}
                        try:
                            save_result(store, image, result, args.label_tag, info)
                        except Exception as failure:  # noqa: BLE001 - e.g. an empty result refused as DICOM SEG
                            error = f"not saved: {type(failure).__name__}: {failure}"
                    if error is None:
                        progress.record(image, info)
                        summary["annotated"].append(image)
                        logger.info(f"{image}: annotated in {info['seconds']:.1f} s on {info['actor']}")
                    else:
                        progress.record(image, error=error)
                        summary["failed"][image] = error
                        logger.error(f"{image}: {error}")
                    bar.update()
            minutes = (time.perf_counter() - segmenting) / 60
            summary["images_per_minute"] = round(len(summary["annotated"]) / minutes, 2)
        finally:
            ray.shutdown()
    summary.update(seconds=round(time.perf_counter() - started, 1), state=str(progress.path))
    print(json.dumps(summary), flush=True)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
