"""Training: the general trainer `fit`, trainable parts and stacked models, the U-Net step, evaluation."""
from mri_poison.train.evaluate import evaluate_cases, predict_case, sliding_window_predict, train_and_evaluate
from mri_poison.train.trainer import fit, guard_finite, tree_finite
from mri_poison.train.loop import load_model, make_loss_fn, make_train_step, train_model, train_step_fn
from mri_poison.train.mesh import make_mesh
from mri_poison.train.parts import apply_gradients, init_state, make_part, stack, stacked_step, unstack
from mri_poison.train.state import make_apply_fn, make_model, make_optimizer
