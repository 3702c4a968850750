"""The micro world: a tiny LLaVA and procedurally generated tasks, trained on CPU in minutes."""
