"""Models the project builds itself: the embedded demo CLIP model and its pretraining recipe."""
from robustbench_ft.zoo.pretrain_demo import PretrainDemoConfig, pretrain_demo

__all__ = ["PretrainDemoConfig", "pretrain_demo"]
