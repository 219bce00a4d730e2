"""pub_optim."""
