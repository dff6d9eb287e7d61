"""Storage Commitment Push (PS3.4 J) toward the archive, as the SCU: the domain side."""
