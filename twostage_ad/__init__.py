"""twostage_ad: two-stage visual anomaly detection (attention-network screen, GANomaly2D scorer)."""

__version__ = "0.1.0"
