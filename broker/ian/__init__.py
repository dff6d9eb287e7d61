"""Instance Availability Notification SOP Class (PS3.4 R), the SCP's domain side."""
