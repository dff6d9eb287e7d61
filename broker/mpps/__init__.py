"""Modality Performed Procedure Step SOP Class (PS3.4 F.7), the SCP's domain side."""
