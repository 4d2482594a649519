/* jsonfile.h - reading a JSON file with jansson, with one-line errors naming the file. */
#pragma once
#include <jansson.h>
#include <stddef.h>

#include "util.h"

/* Parses the file at path (at most max bytes) into *out; with want_object, anything but an
 * object is refused.  -ENOENT (and its message) when the file does not exist. */
int q3_json_read(const char *path, size_t max, bool want_object, json_t **out, q3_err *e);
