"""HTTP front end (FastAPI) and command line of Steer. Routes are thin: validate, authorize,
delegate to `core.service`."""
