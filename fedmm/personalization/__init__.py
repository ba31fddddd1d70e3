"""Personal models: TAP's replacement rule and knowledge distillation."""
