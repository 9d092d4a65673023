"""The command line: `inferd serve | generate | bench | batch | keys | usage`, one module per family."""
