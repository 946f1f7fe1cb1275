/* Compiles the layout assertions as C, the language the ABI header is written for. */
#include "kernel/uapi/kvmi_layout_check.h"

int kvmi_layout_check_c(void) { return (int)sizeof(struct kvmi_event); }
