"""Side effects toward other systems, performed by event handlers: HL7 to the RIS, DICOM to peers."""
