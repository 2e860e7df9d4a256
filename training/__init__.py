"""Training: the demo VLM on the shapes world, TwigVLM twigs on a frozen base, and LLaVA-family model builders."""
