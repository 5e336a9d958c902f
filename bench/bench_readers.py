"""Reading a 512 x 512 x 300 int16 CT (.nii.gz, 0.7 x 0.7 x 1.0 mm) with each reader, medians of --repeats:
MONAI's LoadImage with its NIfTI reader (what MONAI Label uses) and with its ITK reader, SimpleITK,
and the app's reader (samlabel.images.read_nifti: nibabel, MONAI's header correction, the array in
file order); plus gzip decompression alone, and with python-isal's igzip when it is installed.

    .venv/bin/python bench/bench_readers.py [--repeats 3]
"""

import argparse
import gzip
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from bench_networks import median_seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    import SimpleITK as sitk
    from monai.transforms import LoadImage

    from samlabel.images import read_nifti

    shape = (512, 512, 300)
    i, j, _ = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = ((i - 256) / 220.0) ** 2 + ((j - 256) / 170.0) ** 2 <= 1
    volume = (np.where(body, 40, -1000) + np.random.default_rng(0).standard_normal(shape) * 10).astype(np.int16)
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "ct.nii.gz")
        nib.save(nib.Nifti1Image(volume, np.diag([-0.7, -0.7, 1.0, 1.0])), path)
        raw = Path(path).read_bytes()
        readers = {
            "MONAI LoadImage, NibabelReader (MONAI Label's)": lambda: LoadImage(image_only=True, dtype=None)(path),
            "MONAI LoadImage, ITKReader": lambda: LoadImage(reader="ITKReader", image_only=True, dtype=None)(path),
            "SimpleITK ReadImage + array view": lambda: sitk.GetArrayViewFromImage(sitk.ReadImage(path)),
            "samlabel.images.read_nifti (the app's)": lambda: read_nifti(path),
            "gzip decompression alone": lambda: gzip.decompress(raw),
        }
        try:
            from isal import igzip

            readers["python-isal igzip decompression alone"] = lambda: igzip.decompress(raw)
        except ImportError:
            pass
        print(f"{shape} int16, {len(raw) / 1e6:.0f} MB compressed; medians of {args.repeats}")
        print("| reader | seconds |\n|---|---|")
        for name, read in readers.items():
            print(f"| {name} | {median_seconds(read, args.repeats, warm_up=False):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
