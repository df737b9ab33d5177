"""The bench's fixed choices as plain data (no torch import: the command line reads them to build its help)."""

__all__ = ["HYPER", "SHAPES", "VARIANTS"]

#: Hyper-parameters of every variant (MineStudio's VPT fine-tuning recipe, shortened warm-up).
HYPER = dict(lr=1e-3, weight_decay=0.1, warmup_steps=10, clip_norm=1.0, bc_weight=0.01)
#: Default ``(B, T)`` per VPT preset; ``1x`` at a batch a 2-core CPU steps eagerly in a few seconds.
SHAPES = {"tiny": (2, 4), "small": (4, 32), "1x": (1, 16)}
#: The variants, baseline first, with what each runs.
VARIANTS = {
    "minestudio_style": "MineStudio's loop on the module: forward, BC, loss.backward(), clip_grad_norm_, "
                        "torch.optim.AdamW + LambdaLR",
    "eager": "mstudio make_train_step(compile=False), the state donated (step(state, batch, donate=True): the "
             "update in place) as the Trainer runs it",
    "eager_pure": "mstudio make_train_step(compile=False) without donation: a new state every step",
    "compiled": "mstudio make_train_step() (default arguments: compiled)",
}
