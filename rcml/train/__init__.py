"""Trainer components. ``trainer.train(cfg, ds_config)`` wires them; each module owns one concern."""
