"""`audiences bench`: this engine against its peers, side by side in one run."""
