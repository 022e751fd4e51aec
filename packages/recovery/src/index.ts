/** @lifeboat/recovery: public API. */
export {};
