"""The built-in models, registered on import (registry.registered() imports this module)."""

from .engine2d import SliceSegmenter, medsam_masks, sam_med2d_masks
from .engine_auto import AutoSegmentationEngine
from .engine3d import ClickSegmenter3D
from .modeling import build_fastsam3d, build_medsam, build_sam_med2d, build_sam_med3d_turbo
from .modeling.build_sam3d_seg import build_sam3d_seg
from .predictor import normalise_intensity
from .predictor2d import preprocess_medsam, preprocess_sam_med2d
from .prompts import BoxPrompt, PointPrompt
from .registry import ModelSpec, register_model

# The official SAM-Med3D input pipeline (resample to 1.5 mm, RAS+, 128^3 crop, z-score over
# voxels > 0 of the crop), prompts and checkpoint layout: shared by both 3D click models.
SAM_MED3D_INPUT = dict(family="clicks3d", engine=ClickSegmenter3D, prompt=PointPrompt(mask_feedback="logits"),
                       preprocess=normalise_intensity, input_size=(128, 128, 128), spacing_mm=1.5,
                       window_grid="clicks",  # centred on the clicks; "official": README "How a click becomes a mask"
                       checkpoint_key="model_state_dict")
# MedSAM's slice pipeline: CT window 40/400 or MR 0.5-99.5 percentiles to uint8, skimage's cubic resize to 1024^2,
# uint8, min-max to [0, 1]; its mask: sigmoid, bilinear to the slice, > 0.5.
MEDSAM_INPUT = dict(family="slices2d", engine=SliceSegmenter, preprocess=preprocess_medsam, input_size=(1024, 1024),
                    mask_postprocess=medsam_masks, checkpoint_key=None, tasks=("clicks", "uncertainty", "propagation"))

register_model(ModelSpec(name="fastsam3d", title="FastSAM3D", builder=build_fastsam3d, checkpoint_file="FastSAM3D.pth",
                         source="https://huggingface.co/techlove/FastSAM3D (FastSAM3D.pth)",
                         hf_repo="techlove/FastSAM3D", hf_filename="FastSAM3D.pth", **SAM_MED3D_INPUT))
register_model(ModelSpec(name="sam_med3d", title="SAM-Med3D-turbo", builder=build_sam_med3d_turbo,
                         checkpoint_file="sam_med3d_turbo.pth",
                         source="https://huggingface.co/blueyo0/SAM-Med3D (sam_med3d_turbo.pth)",
                         hf_repo="blueyo0/SAM-Med3D", hf_filename="sam_med3d_turbo.pth", **SAM_MED3D_INPUT))
register_model(ModelSpec(name="medsam", title="MedSAM", builder=build_medsam, prompt=BoxPrompt(),
                         checkpoint_file="medsam_vit_b.pth",
                         source="https://drive.google.com/drive/folders/1ETWmi4AiniJeWOt6HAsYgTjYv_fkgzoN (medsam_vit_b.pth)",
                         # the folder linked from MedSAM's README (Google Drive only)
                         download_page="https://drive.google.com/drive/folders/1ETWmi4AiniJeWOt6HAsYgTjYv_fkgzoN",
                         **MEDSAM_INPUT))
register_model(ModelSpec(name="medsam_point", title="MedSAM (point prompt)", builder=build_medsam,
                         prompt=PointPrompt(mask_feedback=None), checkpoint_file="medsam_point_prompt_flare22.pth",
                         source="MedSAM extensions/point_prompt (medsam_point_prompt_flare22.pth, FLARE22 only, experimental)",
                         # the file of MedSAM's point-prompt tutorial (Google Drive only)
                         download_page="https://drive.google.com/file/d/1gAhsHwE-MIs0OuGAe6dcJugxvz6fdWFq/view",
                         **MEDSAM_INPUT))
# SAM-Med2D: the same uint8 slice, SAM's pixel mean/std, nearest resize to 256^2; points and its
# previous mask as probabilities; the best of three masks; its mask: logits bilinear to 256^2, then
# to the slice, sigmoid > 0.5.
register_model(ModelSpec(name="sam_med2d", title="SAM-Med2D", builder=build_sam_med2d, family="slices2d",
                         engine=SliceSegmenter, prompt=PointPrompt(mask_feedback="probabilities", best_of_three=True),
                         preprocess=preprocess_sam_med2d, input_size=(256, 256), mask_postprocess=sam_med2d_masks,
                         checkpoint_file="sam-med2d_b.pth",
                         checkpoint_key="model", source="https://github.com/OpenGVLab/SAM-Med2D (sam-med2d_b.pth)",
                         # from SAM-Med2D's README (Google Drive; Baidu pan 1HWo_s8O7r4iQI6irMYU8vQ, code dk5x)
                         download_page="https://drive.google.com/file/d/1ARiB5RkSsWmAB_8mqWnwDF8ZKTtFwsjl/view",
                         tasks=("clicks", "uncertainty", "propagation")))

# SAM3D: automatic segmentation, a frozen SAM ViT-B per slice + a 3D decoder; the official weights per
# dataset (Google Drive links of its README) are an nnU-Net v1 `.model` with its plans `.model.pkl`
# next to it, kept under their own names in model/<entry>/. The labels are the classes upstream
# evaluates, with their upstream ids; names from Slicer's GenericAnatomyColors where it has them.
SAM3D_INPUT = dict(family="auto3d", builder=build_sam3d_seg, engine=AutoSegmentationEngine, prompt=None, preprocess=None,
                   checkpoint_key="state_dict", encoder_checkpoint_file="sam_vit_b_01ec64.pth",
                   tasks=("segmentation", "training"))
SAM3D_SOURCE = "https://github.com/UARK-AICV/SAM3D (README: the {} weight) and Meta's sam_vit_b_01ec64.pth"
register_model(ModelSpec(name="sam3d_synapse", title="SAM3D (Synapse multi-organ CT)", input_size=(64, 176, 176),
                         checkpoint_file="sam3d_synapse/model_final_checkpoint.model", source=SAM3D_SOURCE.format("Synapse"),
                         download_page="https://drive.google.com/file/d/1jxWSlK1Zy_gBY_XO3xh6ydaLthqDh5Tm/view",
                         labels={"spleen": 1, "right kidney": 2, "left kidney": 3, "gallbladder": 4, "liver": 6,
                                 "stomach": 7, "aorta": 8, "pancreas": 11}, **SAM3D_INPUT))
register_model(ModelSpec(name="sam3d_acdc", title="SAM3D (ACDC cardiac MRI)", input_size=(16, 160, 160),
                         checkpoint_file="sam3d_acdc/model_final_checkpoint.model", source=SAM3D_SOURCE.format("ACDC"),
                         download_page="https://drive.google.com/file/d/1a4fWzwEC9jKBKcZ_kj9wsrtoL8Ha1qpx/view",
                         labels={"right ventricle of heart": 1, "myocardium": 2, "left ventricle of heart": 3},
                         **SAM3D_INPUT))
register_model(ModelSpec(name="sam3d_lung", title="SAM3D (Decathlon lung tumour CT)", input_size=(34, 192, 192),
                         checkpoint_file="sam3d_lung/model_final_checkpoint.model", source=SAM3D_SOURCE.format("Lung"),
                         download_page="https://drive.google.com/file/d/1jraG6uXrXEUyj-tFOMiEIGoDxDJeTQ_X/view",
                         labels={"lung tumor": 1}, **SAM3D_INPUT))
# BraTS: four co-registered MR sequences (its plans' modalities), served from one 4D image (i, j, k, 4); labels as
# its evaluation reads them (ET = 3, TC = 2 + 3, WT = 1 + 2 + 3).
register_model(ModelSpec(name="sam3d_brats", title="SAM3D (BraTS brain tumour MRI, 4 sequences)", input_size=(128, 128, 128),
                         checkpoint_file="sam3d_brats/model_final_checkpoint.model", source=SAM3D_SOURCE.format("BraTS"),
                         download_page="https://drive.google.com/file/d/1ws73ZuxY9fmCcPPE_q9HS4sYHa0symXJ/view",
                         labels={"edema": 1, "non-enhancing tumor": 2, "enhancing tumor": 3}, **SAM3D_INPUT))
