"""Built-in imsd plugins, registered through the ``imsd`` entry point group exactly like a
third party's."""
