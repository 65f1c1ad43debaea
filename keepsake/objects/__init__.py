"""Content-addressed objects: ids, chunking, codecs, manifests, packs, the object database."""
