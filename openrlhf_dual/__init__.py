"""openrlhf-dual: one-shot safety alignment (CAN: MoCAN, PeCAN) as an OpenRLHF plugin."""

__version__ = "0.1.0"
