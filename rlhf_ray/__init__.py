"""rlhf_ray: SFT, reward modelling and RLHF on Ray, vLLM and DeepSpeed."""

__version__ = "0.1.0"
