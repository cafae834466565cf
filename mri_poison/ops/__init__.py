"""Pure array helpers shared by studies: warping and Jacobians (warp), morphology such as the contour band, texture maps (LBP). Import the modules directly, e.g. `from mri_poison.ops import warp`."""
