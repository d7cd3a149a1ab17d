"""What differs between the networks: data, model, optimizer, loss, steps and output files."""
