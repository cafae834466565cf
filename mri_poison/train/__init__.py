"""Training: the jitted train step, the resumable loop, sliding-window evaluation."""
from mri_poison.train.evaluate import evaluate_cases, predict_case, sliding_window_predict, train_and_evaluate
from mri_poison.train.loop import make_loss_fn, make_train_step, train_model
from mri_poison.train.mesh import make_mesh
from mri_poison.train.state import make_apply_fn, make_model, make_optimizer
