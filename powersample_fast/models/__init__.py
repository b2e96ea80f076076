"""The model: config, network, CPU linear, checkpoint loading, the default model."""
