"""One module per pipeline stage; each reads top to bottom: config, set up, train, save."""
