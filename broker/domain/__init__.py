"""The domain: what a worklist broker knows about patients, orders and procedure steps, without wires."""
