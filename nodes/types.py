"""The pack's custom socket types. Type names are part of saved workflows: never rename."""

from comfy_api.latest import io

MAE = io.Custom("ASUKA_MAE")
PRIOR = io.Custom("ASUKA_PRIOR")
ALIGNER = io.Custom("ASUKA_ALIGNER")
DECODER = io.Custom("ASUKA_DECODER")

CATEGORY = "inpaint/asuka"
HD_PAINTER_CATEGORY = "inpaint/hd_painter"   # every HD-Painter node, one menu
