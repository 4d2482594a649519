/* jsonfile.c - reading a JSON file (see jsonfile.h). */
#include "jsonfile.h"

#include <errno.h>
#include <stdlib.h>

int q3_json_read(const char *path, size_t max, bool want_object, json_t **out, q3_err *e)
{
	char *buf;
	size_t len;
	json_error_t je;
	int err;

	*out = NULL;
	if ((err = q3_read_file(path, max, &buf, &len, e)))
		return err;
	*out = json_loadb(buf, len, 0, &je);
	free(buf);
	if (!*out)
		return q3_errf(e, -EINVAL, "%s: line %d column %d: %s", path, je.line, je.column, je.text);
	if (want_object && !json_is_object(*out)) {
		json_decref(*out);
		*out = NULL;
		return q3_errf(e, -EINVAL, "%s: expected a JSON object", path);
	}
	return 0;
}
