"""The control protocol between a producer and its jobs: messages and their strict wire form
(messages.py). Imports no torch or DALI."""
