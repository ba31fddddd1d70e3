"""Local training and the ClientApp's message handlers."""
