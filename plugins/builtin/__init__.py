"""The plugins FetchML ships with; each is a small module of its own."""

BUILTIN_PLUGINS = [
    "plugins.builtin.tensorboard.TensorBoardPlugin",
    "plugins.builtin.mlflow.MLflowPlugin",
    "plugins.builtin.wandb.WandbPlugin",
]
