/* chat.c - the Qwen3-Instruct-2507 chat template, hand-rendered (see chat.h).  Each block below
 * mirrors one block of chat_template.jinja, which is kept verbatim in q3_chat_template_text. */
#include "chat.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "json_py.h"
#include "jsonfile.h"
#include "strbuf.h"

#define MAX_CONFIG (64u << 20)

const char q3_chat_template_text[] =
	"{%- if tools %}\n"
	"    {{- '<|im_start|>system\\n' }}\n"
	"    {%- if messages[0].role == 'system' %}\n"
	"        {{- messages[0].content + '\\n\\n' }}\n"
	"    {%- endif %}\n"
	"    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
	"    {%- for tool in tools %}\n"
	"        {{- \"\\n\" }}\n"
	"        {{- tool | tojson }}\n"
	"    {%- endfor %}\n"
	"    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
	"{%- else %}\n"
	"    {%- if messages[0].role == 'system' %}\n"
	"        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
	"    {%- endif %}\n"
	"{%- endif %}\n"
	"{%- for message in messages %}\n"
	"    {%- if message.content is string %}\n"
	"        {%- set content = message.content %}\n"
	"    {%- else %}\n"
	"        {%- set content = '' %}\n"
	"    {%- endif %}\n"
	"    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
	"        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
	"    {%- elif message.role == \"assistant\" %}\n"
	"        {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
	"        {%- if message.tool_calls %}\n"
	"            {%- for tool_call in message.tool_calls %}\n"
	"                {%- if (loop.first and content) or (not loop.first) %}\n"
	"                    {{- '\\n' }}\n"
	"                {%- endif %}\n"
	"                {%- if tool_call.function %}\n"
	"                    {%- set tool_call = tool_call.function %}\n"
	"                {%- endif %}\n"
	"                {{- '<tool_call>\\n{\"name\": \"' }}\n"
	"                {{- tool_call.name }}\n"
	"                {{- '\", \"arguments\": ' }}\n"
	"                {%- if tool_call.arguments is string %}\n"
	"                    {{- tool_call.arguments }}\n"
	"                {%- else %}\n"
	"                    {{- tool_call.arguments | tojson }}\n"
	"                {%- endif %}\n"
	"                {{- '}\\n</tool_call>' }}\n"
	"            {%- endfor %}\n"
	"        {%- endif %}\n"
	"        {{- '<|im_end|>\\n' }}\n"
	"    {%- elif message.role == \"tool\" %}\n"
	"        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n"
	"            {{- '<|im_start|>user' }}\n"
	"        {%- endif %}\n"
	"        {{- '\\n<tool_response>\\n' }}\n"
	"        {{- content }}\n"
	"        {{- '\\n</tool_response>' }}\n"
	"        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
	"            {{- '<|im_end|>\\n' }}\n"
	"        {%- endif %}\n"
	"    {%- endif %}\n"
	"{%- endfor %}\n"
	"{%- if add_generation_prompt %}\n"
	"    {{- '<|im_start|>assistant\\n' }}\n"
	"{%- endif %}";

static const char TOOLS_HEAD[] =
	"# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
	"You are provided with function signatures within <tools></tools> XML tags:\n<tools>";
static const char TOOLS_TAIL[] =
	"\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
	"<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
	"<args-json-object>}\n</tool_call><|im_end|>\n";

enum role { R_SYSTEM, R_USER, R_ASSISTANT, R_TOOL };
static const char *const role_name[] = { "system", "user", "assistant", "tool" };

struct render {
	struct q3_sb sb;
	int err; /* sticky -ENOMEM */
};

static void put(struct render *r, const char *s, size_t n)
{
	if (!r->err)
		r->err = q3_sb_add(&r->sb, s, n);
}

static void puts_(struct render *r, const char *s)
{
	put(r, s, strlen(s));
}

/* The template's `content`: the string, or '' for anything else. */
static void put_content(struct render *r, const json_t *c)
{
	if (json_is_string(c))
		put(r, json_string_value(c), json_string_length(c));
}

static bool content_truthy(const json_t *c)
{
	return json_is_string(c) && json_string_length(c) > 0;
}

static int render_tool_calls(struct render *r, const json_t *m, size_t i, q3_err *e)
{
	const json_t *tcs = json_object_get(m, "tool_calls"), *tc;
	size_t j;

	if (!tcs || json_is_null(tcs))
		return 0;
	if (!json_is_array(tcs))
		return q3_errf(e, -EINVAL, "messages[%zu].tool_calls: expected an array or null", i);
	json_array_foreach(tcs, j, tc) {
		const json_t *fn, *name, *args;
		const char *part = "";
		if (!json_is_object(tc))
			return q3_errf(e, -EINVAL, "messages[%zu].tool_calls[%zu]: expected an object", i, j);
		fn = json_object_get(tc, "function");
		if (fn && !json_is_null(fn) && !json_is_object(fn))
			return q3_errf(e, -EINVAL, "messages[%zu].tool_calls[%zu].function: expected an object", i, j);
		if (json_object_size(fn)) { /* {%- if tool_call.function %} */
			tc = fn;
			part = ".function";
		}
		name = json_object_get(tc, "name");
		args = json_object_get(tc, "arguments");
		if (!json_is_string(name))
			return q3_errf(e, -EINVAL, "messages[%zu].tool_calls[%zu]%s.name: expected a string", i, j, part);
		if (!args)
			return q3_errf(e, -EINVAL, "messages[%zu].tool_calls[%zu]%s.arguments: missing", i, j, part);
		if (j > 0 || content_truthy(json_object_get(m, "content")))
			puts_(r, "\n");
		puts_(r, "<tool_call>\n{\"name\": \"");
		put(r, json_string_value(name), json_string_length(name));
		puts_(r, "\", \"arguments\": ");
		if (json_is_string(args))
			put(r, json_string_value(args), json_string_length(args));
		else if (!r->err)
			r->err = q3_json_py(&r->sb, args);
		puts_(r, "}\n</tool_call>");
	}
	return 0;
}

static int check_request(const json_t *req, const json_t **msgs, const json_t **tools, bool *agp, q3_err *e)
{
	const json_t *v;

	if (!json_is_object(req))
		return q3_errf(e, -EINVAL, "request: expected a JSON object");
	*msgs = json_object_get(req, "messages");
	if (!json_is_array(*msgs) || !json_array_size(*msgs))
		return q3_errf(e, -EINVAL, "messages: expected a non-empty array");
	*tools = json_object_get(req, "tools");
	if (*tools && !json_is_null(*tools) && !json_is_array(*tools))
		return q3_errf(e, -EINVAL, "tools: expected an array or null");
	v = json_object_get(req, "add_generation_prompt");
	if (v && !json_is_boolean(v))
		return q3_errf(e, -EINVAL, "add_generation_prompt: expected true or false");
	*agp = !v || json_is_true(v);
	return 0;
}

static int get_roles(const json_t *msgs, enum role *roles, q3_err *e)
{
	const json_t *m;
	size_t i;

	json_array_foreach(msgs, i, m) {
		const json_t *role = json_object_get(m, "role");
		size_t k;
		if (!json_is_object(m))
			return q3_errf(e, -EINVAL, "messages[%zu]: expected an object", i);
		if (!json_is_string(role))
			return q3_errf(e, -EINVAL, "messages[%zu].role: expected a string", i);
		for (k = 0; k < Q3_ARRAY_SIZE(role_name); k++)
			if (!strcmp(json_string_value(role), role_name[k]))
				break;
		if (k == Q3_ARRAY_SIZE(role_name))
			return q3_errf(e, -EINVAL, "messages[%zu].role: unknown role \"%.32s\" (expected system, user, "
				       "assistant or tool)", i, json_string_value(role));
		roles[i] = (enum role)k;
	}
	return 0;
}

int q3_chat_render(const json_t *req, char **text, size_t *len, q3_err *e)
{
	const json_t *msgs, *tools, *m, *sys = NULL;
	struct render r = { Q3_SB_INIT, 0 };
	enum role *roles;
	size_t n, i;
	bool agp = true;
	int err;

	*text = NULL;
	*len = 0;
	if ((err = check_request(req, &msgs, &tools, &agp, e)))
		return err;
	n = json_array_size(msgs);
	roles = malloc(n * sizeof(*roles));
	if (!roles)
		return q3_errf(e, -ENOMEM, "out of memory");
	if ((err = get_roles(msgs, roles, e)))
		goto out;
	if (roles[0] == R_SYSTEM) {
		sys = json_object_get(json_array_get(msgs, 0), "content");
		if (!json_is_string(sys)) {
			err = q3_errf(e, -EINVAL, "messages[0].content: expected a string (the template concatenates "
				      "the first system message)");
			goto out;
		}
	}

	if (json_array_size(tools)) { /* {%- if tools %} */
		const json_t *tool;
		puts_(&r, "<|im_start|>system\n");
		if (sys) {
			put_content(&r, sys);
			puts_(&r, "\n\n");
		}
		puts_(&r, TOOLS_HEAD);
		json_array_foreach(tools, i, tool) {
			puts_(&r, "\n");
			if (!r.err)
				r.err = q3_json_py(&r.sb, tool);
		}
		puts_(&r, TOOLS_TAIL);
	} else if (sys) {
		puts_(&r, "<|im_start|>system\n");
		put_content(&r, sys);
		puts_(&r, "<|im_end|>\n");
	}

	json_array_foreach(msgs, i, m) {
		const json_t *content = json_object_get(m, "content");
		switch (roles[i]) {
		case R_SYSTEM:
			if (i == 0)
				break;
			/* a later system message renders like a user one */
			__attribute__((fallthrough));
		case R_USER:
			puts_(&r, "<|im_start|>");
			puts_(&r, role_name[roles[i]]);
			puts_(&r, "\n");
			put_content(&r, content);
			puts_(&r, "<|im_end|>\n");
			break;
		case R_ASSISTANT:
			puts_(&r, "<|im_start|>assistant\n");
			put_content(&r, content);
			if ((err = render_tool_calls(&r, m, i, e)))
				goto out;
			puts_(&r, "<|im_end|>\n");
			break;
		case R_TOOL:
			if (i == 0 || roles[i - 1] != R_TOOL)
				puts_(&r, "<|im_start|>user");
			puts_(&r, "\n<tool_response>\n");
			put_content(&r, content);
			puts_(&r, "\n</tool_response>");
			if (i == n - 1 || roles[i + 1] != R_TOOL)
				puts_(&r, "<|im_end|>\n");
			break;
		}
	}
	if (agp)
		puts_(&r, "<|im_start|>assistant\n");
	if (r.err) {
		err = q3_errf(e, -ENOMEM, "out of memory");
		goto out;
	}
	*text = q3_sb_take(&r.sb, len);
	if (!*text)
		err = q3_errf(e, -ENOMEM, "out of memory");
out:
	free(roles);
	q3_sb_free(&r.sb);
	return err;
}

/* The folder's template: chat_template.jinja, else tokenizer_config.json "chat_template" (a
 * string, or a list of {"name", "template"} of which "default" is used). */
static int folder_template(const char *dir, char **tmpl, char *where, size_t wlen, q3_err *e)
{
	char path[4096];
	size_t len;
	json_t *cfg, *ct;
	int err;

	*tmpl = NULL;
	if (q3_path_join(path, sizeof(path), dir, "chat_template.jinja"))
		return q3_errf(e, -ENAMETOOLONG, "%s: path too long", dir);
	snprintf(where, wlen, "%s", path);
	err = q3_read_file(path, MAX_CONFIG, tmpl, &len, e);
	if (err != -ENOENT)
		return err;
	if (q3_path_join(path, sizeof(path), dir, "tokenizer_config.json"))
		return q3_errf(e, -ENAMETOOLONG, "%s: path too long", dir);
	snprintf(where, wlen, "%s", path);
	if ((err = q3_json_read(path, MAX_CONFIG, false, &cfg, e)))
		return err;
	ct = json_object_get(cfg, "chat_template");
	if (json_is_array(ct)) {
		json_t *x, *pick = NULL;
		size_t i;
		json_array_foreach(ct, i, x) {
			json_t *name = json_object_get(x, "name");
			if (!pick || (json_is_string(name) && !strcmp(json_string_value(name), "default")))
				pick = json_object_get(x, "template");
		}
		ct = pick;
	}
	if (json_is_string(ct))
		*tmpl = strdup(json_string_value(ct));
	json_decref(cfg);
	return 0;
}

int q3_chat_check_template(const char *dir, q3_err *e)
{
	char where[4096], *tmpl;
	int err = folder_template(dir, &tmpl, where, sizeof(where), e);

	if (err)
		return err;
	if (!tmpl)
		return q3_errf(e, 1, "%s: no chat_template; rendering the Qwen3-Instruct-2507 one", where);
	err = strcmp(tmpl, q3_chat_template_text) ? 1 : 0;
	free(tmpl);
	if (err)
		return q3_errf(e, 1, "%s: the chat template differs from the Qwen3-Instruct-2507 one rendered here",
			       where);
	return 0;
}
