package broker

import "fmt"

func sprintf(format string, args ...interface{}) string { return fmt.Sprintf(format, args...) }
