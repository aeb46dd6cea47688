"""The HTTP routes, one module per resource: `status` (probes, info, metrics), `search`,
`gallery` (gallery images), `video`, `admin`; thin handlers that read the request, call the
engine and hand its hits to `service.shaping`."""
