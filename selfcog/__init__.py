"""selfcog: a self-hosted chat bot that learns who it is from its users' corrections."""
