"""One module per `eyecare-edge` sub-command; each imports its heavy room inside the command body."""
