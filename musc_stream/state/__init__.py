"""Line state on disk: snapshot files (store), what a snapshot writes (plan), the writer thread."""
