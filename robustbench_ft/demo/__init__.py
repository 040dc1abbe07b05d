"""The procedural data behind the embedded demo suite: MNIST and scikit-learn digits from installed packages,
digits rendered in held-out fonts, inversions and MNIST-C corruptions (``samples``), and the rendering and
caption generator of the demo model's pretraining (``render``)."""
