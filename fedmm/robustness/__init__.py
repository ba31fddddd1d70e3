"""Trust scoring maths, the attack suite and the server's clean root set."""
