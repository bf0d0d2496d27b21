"""File I/O: MRC micrographs, coordinate formats (RELION STAR, box, cbox, Topaz), name matching."""
