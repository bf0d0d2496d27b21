"""File I/O: MRC micrographs, coordinate formats (RELION STAR, box, cbox, Topaz, cryoSPARC), name matching, RELION
writers. Readers never print: what they skip or drop comes back to the command, which reports it."""
