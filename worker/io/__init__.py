"""Reading and writing files: data files of every format, and the artifact store."""
