"""eyecare-edge: EyecareGPT from training to fast, validated edge inference.

The runtime package (`eyecare_edge` proper) never imports torch or transformers; the rooms that do
(`eyecare_edge.training`, `eyecare_edge.export`, `eyecare_edge.calibration`) are imported only by
the commands that need them. See ARCHITECTURE.md.
"""

__version__ = "0.1.0"
