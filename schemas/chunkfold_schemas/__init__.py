"""Wire models for every chunkfold topic record; importable on their own by downstream services."""
