/* version.h - the one place the version lives. */
#pragma once
#define QWEN3D_VERSION "0.1.0"
